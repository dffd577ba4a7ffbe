"""What the fuzzers feed: bytes to every reader of untrusted files (the ``.bna`` fit file, the
``.npz``/``.npy`` data loaders, and the check of a ``.pt2`` archive before PyTorch reads it).
Whatever the bytes, only the tool's own input errors (:class:`bna_export.BnaError`) may come
out; anything else is a bug the fuzzers report.

Used by ``tests/test_fuzz.py`` (hypothesis) and ``fuzz/fuzz_inputs.py`` (atheris).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np
import torch

from bna_export import artifact, fitfile, html_report, report
from bna_export.data import load_inputs, load_npz
from bna_export.errors import BnaError
from bna_export.pt2file import check_archive

READERS = ("fit", "npz", "npy", "pt2")
_DIR = tempfile.mkdtemp(prefix="bna-fuzz-")


def read_fit(buf: bytes) -> None:
    """Decode a fit file and use it as ``evaluate``/``build``/``inspect`` would."""
    try:
        rec = fitfile.read(artifact.decode(buf))
        report.score_histograms(rec.scores, rec.detection)
        report.detected_pairs(rec.scores, rec.detection)
        report.inspect_lines(rec, "fit.bna")
        html_report.render(rec, "fit.bna", "0" * 64, None, draw=False)
        fitfile.Mitigation.from_record(rec)
    except BnaError:
        pass


def read_data(buf: bytes, suffix: str) -> None:
    """Write the bytes to a file and load it as a labelled set (.npz) or images (.npy)."""
    path = os.path.join(_DIR, "data" + suffix)
    with open(path, "wb") as f:
        f.write(buf)
    try:
        if suffix == ".npz":
            load_npz(path, extra=("attack_label",))
        else:
            load_inputs(path)
    except BnaError:
        pass


def one_input(buf: bytes) -> None:
    """The first byte picks the reader, the rest is the file."""
    if not buf:
        return
    reader, rest = READERS[buf[0] % len(READERS)], buf[1:]
    if reader == "fit":
        read_fit(rest)
    elif reader == "pt2":
        with contextlib.suppress(BnaError):
            check_archive(rest, "model.pt2")
    else:
        read_data(rest, "." + reader)


def seeds() -> dict[str, bytes]:
    """Small valid inputs of each reader (with their selector byte): the fuzzers mutate them."""
    rng = np.random.default_rng(0)
    fit = artifact.FitFile(
        {
            "mode": "detect",
            "targets": [1],
            "sources": {"1": [0]},
            "n_classes": 3,
            "input_shape": [1, 4, 4],
            "input_range": [0.0, 1.0],
            "layers": [{"index": 0, "name": "bn", "channels": 2, "eps": 1e-5}],
            "scores": {
                "patch": [
                    {
                        "source": 0,
                        "target": 1,
                        "size": 1.0,
                        "statistic": 1.0,
                        "score": 8.5,
                        "detected": True,
                    }
                ]
            },
            "detection": {
                "rule": "union",
                "normalise": "row",
                "consistency": 0.5,
                "threshold": 7.0,
                "side": "large",
                "scores_computed": True,
                "pair_families": {"0:1": "patch"},
                "detected_pairs": [[0, 1]],
                "all_to_one": {"1": "patch"},
                "target_scores": {"patch": [0.0, 8.0, None]},
                "pooled_scores": {"patch": [0.0, 9.0, 1.0]},
                "pooled_sizes": {"patch": [3.0, 1.0, None]},
                "intrinsic": {},
            },
            "triggers": [
                {
                    "index": 0,
                    "family": "patch",
                    "target": 1,
                    "sources": [0],
                    "restart": 0,
                    "size": 1.0,
                    "relative_size": 0.1,
                    "success": 0.9,
                    "steps": 10,
                    "used": True,
                }
            ],
            "settings": {},
            "evidence": {
                "model_sha256": None,
                "divergence": "tv",
                "audit": {
                    "clean": False,
                    "findings": [{"node": "w", "op": "Where", "reason": "r", "constants": []}],
                    "detached_outputs": [],
                },
            },
        },
        {
            **{f"layer.0.{k}": np.ones(2, np.float32) for k in ("running_mean", "running_var")},
            **{f"layer.0.{k}": np.ones(2, np.float32) for k in ("weight", "bias")},
            "theta.0": rng.normal(size=(1, 4, 2)).astype(np.float32),
            "trigger.0.mask": rng.random((1, 4, 4), dtype=np.float32),
            "trigger.0.pattern": rng.random((1, 4, 4), dtype=np.float32),
            "probe.x": rng.random((2, 1, 4, 4), dtype=np.float32),
            "probe.label": np.array([0, 1], np.int64),
            "probe.triggered": np.array([False, True]),
            "probe.f_logits": rng.normal(size=(2, 3)).astype(np.float32),
            "probe.g_logits": rng.normal(size=(1, 2, 3)).astype(np.float32),
            "probe.logits": rng.normal(size=(2, 3)).astype(np.float32),
            "probe.truth": np.array([0, 0], np.int64),
            "probe.trigger_of": np.array([-1, 1], np.int64),
            "divergence.floor": np.zeros((1, 1), np.float32),
            "divergence.before": np.ones((1, 1), np.float32),
            "divergence.after": np.zeros((1, 1), np.float32),
        },
    )
    npz, npy = io.BytesIO(), io.BytesIO()
    x = rng.random((3, 1, 4, 4), dtype=np.float32)
    np.savez(npz, x=x, y=np.array([0, 1, 2]), attack_label=np.array([1, 1, 1]))
    np.save(npy, (x * 255).astype(np.uint8))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    pt2 = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.from_numpy(x[:1]),)), pt2)
    return {
        "fit": bytes([0]) + artifact.encode(fit),
        "npz": bytes([1]) + npz.getvalue(),
        "npy": bytes([2]) + npy.getvalue(),
        "pt2": bytes([3]) + pt2.getvalue(),
    }

"""ONNX Runtime sessions with an explicit execution provider, and batched inference of a built
graph (its outputs ``label``, ``triggered``, ``logits``). The serving side: it needs only
onnxruntime and numpy (``import bna_export.runtime`` does not import torch or onnx)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from .errors import BadInputError, ModelError

Provider = Literal["auto", "cuda", "cpu"]
_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def providers_for(choice: Provider) -> list[str]:
    """The provider list for a choice: ``cuda`` fails when CUDA is not available; ``auto``
    takes CUDA when the installed ONNX Runtime has it, else the CPU."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [_NAMES["cpu"]]
    if choice == "cuda":
        if _NAMES["cuda"] not in available:
            raise BadInputError(
                "--provider cuda: this ONNX Runtime has no CUDA execution provider "
                f"(it has {', '.join(available)}); install the 'cuda' extra (onnxruntime-gpu)"
            )
        return [_NAMES["cuda"], _NAMES["cpu"]]
    if choice == "auto":
        return [_NAMES["cuda"], _NAMES["cpu"]] if _NAMES["cuda"] in available else [_NAMES["cpu"]]
    raise BadInputError(f"unknown provider {choice!r}: auto, cuda or cpu")


def session(
    model: bytes | str, provider: Provider = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """An inference session on the chosen provider (``model``: serialized bytes or a path).
    Fails when the provider asked for did not take the session."""
    ort.set_default_logger_severity(3)  # CUDA's ScatterND warns on every session otherwise
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    wanted = providers_for(provider)
    try:
        sess = ort.InferenceSession(model, options, providers=wanted)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelError(f"ONNX Runtime cannot load the graph: {exc}") from exc
    if provider == "cuda" and sess.get_providers()[0] != _NAMES["cuda"]:
        raise BadInputError("--provider cuda: CUDA did not take the session (no GPU visible?)")
    return sess


OUTPUTS = ("label", "triggered", "logits")
"""The outputs of a graph made by ``build``, in order."""
F_LOGITS = "bna.f_logits"
"""The metadata key naming f's own logits inside a built graph."""


def looks_built(outputs: Sequence[str], metadata: Mapping[str, str]) -> bool:
    """Whether a graph with these output names and metadata was made by ``build`` (f's logits
    may follow as a fourth output: :func:`bna_export.onnxfile.load_built`)."""
    names = tuple(outputs)
    if F_LOGITS in metadata and names[3:] == (metadata[F_LOGITS],):
        names = names[:3]
    return names == OUTPUTS and F_LOGITS in metadata


def open_built(
    model: bytes | str | Path, provider: Provider = "cpu"
) -> tuple[ort.InferenceSession, dict[str, str]]:
    """A session on a graph made by ``build`` (its bytes or its path) and its metadata. A built
    graph holds its weights inline: a path is read as bytes, so no external-data reference in
    a file is ever followed."""
    if isinstance(model, bytes):
        where, sess = "the graph", session(model, provider)
    else:
        where = str(model)
        try:
            data = Path(model).read_bytes()
        except OSError as exc:
            raise BadInputError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
        try:
            sess = session(data, provider)
        except ModelError as exc:  # e.g. weights in external data, which a built graph never has
            raise BadInputError(f"{where}: not a graph made by `bna-export build` ({exc})") from exc
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if not looks_built([o.name for o in sess.get_outputs()], meta):
        raise BadInputError(f"{where}: not a graph made by `bna-export build`")
    return sess, meta


def check_inputs(sess: ort.InferenceSession, x: np.ndarray, source: str) -> None:
    """Fail with one line unless the images ``x`` (from ``source``) fit the graph's input."""
    want = tuple(sess.get_inputs()[0].shape[1:])
    if len(want) != x.ndim - 1 or any(
        isinstance(d, int) and d != n for d, n in zip(want, x.shape[1:], strict=True)
    ):
        raise BadInputError(f"{source}: images are {x.shape[1:]} but the graph takes {want}")


def ran_on(sess: ort.InferenceSession) -> str:
    """'cuda' or 'cpu': the provider that runs the session's nodes first."""
    return "cuda" if sess.get_providers()[0] == _NAMES["cuda"] else "cpu"


@dataclass
class Outputs:
    """What a built graph answers: routed labels, flags and logits."""

    label: np.ndarray
    triggered: np.ndarray
    logits: np.ndarray

    def to_npz(self) -> bytes:
        """The ``.npz`` that ``run -o`` writes: ``label``, ``triggered``, ``logits``."""
        buf = io.BytesIO()
        np.savez(buf, label=self.label, triggered=self.triggered, logits=self.logits)
        return buf.getvalue()


def run_built(
    sess: ort.InferenceSession,
    x: np.ndarray,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Outputs:
    """Run a built graph over x in batches."""
    name = sess.get_inputs()[0].name
    parts: list[list[np.ndarray]] = [[], [], []]
    x = np.ascontiguousarray(x, dtype=np.float32)
    for start in range(0, len(x), batch_size):
        outs = sess.run(["label", "triggered", "logits"], {name: x[start : start + batch_size]})
        for part, o in zip(parts, outs, strict=True):
            part.append(o)
        if progress is not None:
            progress(min(start + batch_size, len(x)), len(x))
    if not len(x):
        k = sess.get_outputs()[2].shape[-1]
        k = k if isinstance(k, int) else 0
        return Outputs(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, k), np.float32))
    return Outputs(*(np.concatenate(p) for p in parts))

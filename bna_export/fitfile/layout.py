"""The one writer and the one reader of a fit file's header layout and tensor names
(:mod:`bna_export.artifact` owns the bytes): a record (:mod:`bna_export.fitfile.records`) becomes
a :class:`~bna_export.artifact.FitFile` and back, validated once when read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifact
from ..artifact import FitFile
from ..errors import FitFileError
from .detection import detection_header, read_detection, read_score, score_header
from .evidence import evidence_header, evidence_tensors, read_evidence
from .fields import (
    fail,
    get,
    read_bool,
    read_dict,
    read_float,
    read_int,
    read_list,
    read_str,
    tensor,
)
from .records import (
    FitRecord,
    Layer,
    Probes,
    Trigger,
    check_routing,
)

# --- writing -----------------------------------------------------------------------------


def header_of(rec: FitRecord) -> dict[str, Any]:
    """The JSON header of a record (without the format version and tensor table, which
    :mod:`bna_export.artifact` adds)."""
    targets = rec.targets
    return {
        "tool": "bna-export",
        "tool_version": rec.tool_version,
        "mode": rec.mode,
        "attacked": rec.attacked,
        "n_classes": rec.n_classes,
        "model_format": rec.model_format,
        "input_shape": list(rec.input_shape),
        "input_range": [float(rec.input_range[0]), float(rec.input_range[1])],
        "targets": targets,
        "sources": {str(t): list(s) for t, s in rec.sources.items()},
        "source_routed": list(rec.source_routed),
        "flag_drops": [float(d) for d in rec.flag_drops],
        "pairs": [list(p) for p in rec.pairs],
        "families": {str(t): f for t, f in rec.families.items()},
        "scores": {f: [score_header(p) for p in v] for f, v in rec.scores.items()},
        "detection": detection_header(rec.detection),
        "triggers": [
            {
                "index": tr.index,
                "family": tr.family,
                "target": tr.target,
                "sources": list(tr.sources),
                "restart": tr.restart,
                "refresh_round": tr.refresh_round,
                "size": tr.size,
                "relative_size": tr.relative_size,
                "success": tr.success,
                "steps": tr.steps,
                "used": tr.used,
            }
            for tr in rec.triggers
        ],
        "layers": [
            {
                "index": la.index,
                "name": la.name,
                "channels": la.channels,
                "eps": la.eps,
                "measured": la.measured,
            }
            for la in rec.layers
        ],
        "settings": rec.settings,
        "history": list(rec.history),
        "data": {"images": rec.data_images, "sha256": rec.data_sha256},
        **({} if rec.evidence is None else {"evidence": evidence_header(rec.evidence)}),
    }


_LAYER_TENSORS = ("running_mean", "running_var", "weight", "bias")
_PROBE_TENSORS = {
    "x": np.float32,
    "f_logits": np.float32,
    "g_logits": np.float32,
    "label": np.int64,
    "triggered": np.bool_,
    "logits": np.float32,
}
_PROBE_ROLES = ("truth", "trigger_of")  # optional: absent in fit files before ``report``


def to_fit(rec: FitRecord) -> FitFile:
    """The fit file of a record (encode it with :func:`bna_export.artifact.encode`)."""
    tensors: dict[str, np.ndarray] = {}
    for la in rec.layers:
        for key in _LAYER_TENSORS:
            tensors[f"layer.{la.index}.{key}"] = np.asarray(getattr(la, key), np.float32)
        tensors[f"theta.{la.index}"] = np.asarray(la.theta, np.float32)
        if la.probe_mean is not None:
            tensors[f"layer.{la.index}.probe_mean"] = np.asarray(la.probe_mean, np.float32)
    for tr in rec.triggers:
        for key, value in tr.params.items():
            tensors[f"trigger.{tr.index}.{key}"] = np.asarray(value, np.float32)
    if rec.probes is not None:
        for key, dtype in _PROBE_TENSORS.items():
            tensors[f"probe.{key}"] = np.asarray(getattr(rec.probes, key), dtype)
        for key in _PROBE_ROLES:
            if getattr(rec.probes, key) is not None:
                tensors[f"probe.{key}"] = np.asarray(getattr(rec.probes, key), np.int64)
    if rec.evidence is not None:
        tensors.update(evidence_tensors(rec.evidence))
    return FitFile(header_of(rec), tensors)


# --- reading -----------------------------------------------------------------------------


def _trigger(v: Any, what: str, tensors: Mapping[str, np.ndarray]) -> Trigger:
    d = read_dict(v, what)
    index = read_int(get(d, "index", what), f"{what}.index")
    prefix = f"trigger.{index}."
    return Trigger(
        index,
        read_str(get(d, "family", what), f"{what}.family"),
        read_int(get(d, "target", what), f"{what}.target"),
        read_list(get(d, "sources", what), f"{what}.sources", read_int),
        read_int(get(d, "restart", what), f"{what}.restart"),
        read_int(d.get("refresh_round", 0), f"{what}.refresh_round"),
        read_float(get(d, "size", what), f"{what}.size"),
        read_float(get(d, "relative_size", what), f"{what}.relative_size"),
        read_float(get(d, "success", what), f"{what}.success"),
        read_int(get(d, "steps", what), f"{what}.steps"),
        read_bool(get(d, "used", what), f"{what}.used"),
        {k.removeprefix(prefix): a for k, a in tensors.items() if k.startswith(prefix)},
    )


def _layer(
    v: Any, i: int, n_targets: int, n_probes: int | None, tensors: Mapping[str, np.ndarray]
) -> Layer:
    what = f"layers[{i}]"
    d = read_dict(v, what)
    c = read_int(get(d, "channels", what), f"{what}.channels")
    stats = [tensor(tensors, f"layer.{i}.{k}", (c,)) for k in _LAYER_TENSORS]
    theta = tensor(tensors, f"theta.{i}", (n_targets, 4, c))
    probe = tensors.get(f"layer.{i}.probe_mean")
    if probe is not None and (n_probes is None or probe.shape != (n_probes, c)):
        raise FitFileError(f"fit file: tensor 'layer.{i}.probe_mean' has shape {probe.shape}")
    return Layer(
        i,
        read_str(get(d, "name", what), f"{what}.name"),
        c,
        read_float(get(d, "eps", what), f"{what}.eps"),
        read_bool(d.get("measured", False), f"{what}.measured"),
        *stats,
        theta,
        probe,
    )


def _probes(tensors: Mapping[str, np.ndarray], n_targets: int) -> Probes | None:
    names = [f"probe.{k}" for k in _PROBE_TENSORS]
    if not all(n in tensors for n in names):
        return None
    roles = [tensors.get(f"probe.{k}") for k in _PROBE_ROLES]
    p = Probes(*(tensors[n] for n in names), *roles)
    present = [r for r in roles if r is not None]
    ranks = {p.x.ndim >= 2, p.f_logits.ndim == 2, p.logits.ndim == 2, p.g_logits.ndim == 3}
    ranks |= {a.ndim == 1 for a in (p.label, p.triggered, *present)}
    if ranks != {True} or any(not np.issubdtype(r.dtype, np.integer) for r in present):
        raise FitFileError("fit file: the probe tensors have the wrong rank")
    n = len(p.x)
    per_probe = [p.f_logits, p.label, p.triggered, p.logits, *present]
    if any(len(a) != n for a in per_probe) or p.g_logits.shape[:2] != (n_targets, n):
        raise FitFileError("fit file: the probe tensors disagree in length")
    return p


def read(fit: FitFile) -> FitRecord:
    """The record of a decoded fit file; raises :class:`FitFileError` on anything missing or
    of the wrong type or shape that the commands read (a fit file is untrusted input; fields
    added after format version 1 take their defaults when absent)."""
    h, t = fit.header, fit.tensors
    try:
        targets = read_list(get(h, "targets", "header"), "targets", read_int)
        if len(set(targets)) != len(targets):
            raise fail("a target is listed twice")
        raw_sources = read_dict(get(h, "sources", "header"), "sources")
        sources = {
            c: read_list(get(raw_sources, str(c), "sources"), f"sources.{c}", read_int)
            for c in targets
        }
        raw_families = read_dict(h.get("families", {}), "families")
        shape = read_list(get(h, "input_shape", "header"), "input_shape", read_int)
        lo, hi = read_list(get(h, "input_range", "header"), "input_range", read_float)
        if not -np.inf < lo < hi < np.inf:
            raise fail("input_range is not LO < HI, both finite")
        probes = _probes(t, len(targets))
        layers = read_list(get(h, "layers", "header"), "layers", lambda v, _w: v)
        data = read_dict(h.get("data", {}), "data")
        rec = FitRecord(
            read_str(h.get("tool_version", "unknown"), "tool_version"),
            read_str(get(h, "mode", "header"), "mode"),
            read_int(get(h, "n_classes", "header"), "n_classes"),
            read_str(h.get("model_format", "torch"), "model_format"),
            shape,
            (lo, hi),
            sources,
            {c: read_str(raw_families.get(str(c), ""), "families") for c in targets},
            {
                f: read_list(v, f"scores.{f}", read_score)
                for f, v in read_dict(get(h, "scores", "header"), "scores").items()
            },
            read_detection(get(h, "detection", "header")),
            read_list(get(h, "triggers", "header"), "triggers", lambda v, w: _trigger(v, w, t)),
            tuple(
                _layer(v, i, len(targets), None if probes is None else len(probes.x), t)
                for i, v in enumerate(layers)
            ),
            read_dict(get(h, "settings", "header"), "settings"),
            read_list(h.get("history", []), "history", read_float),
            read_int(data.get("images", 0), "data.images"),
            read_str(data.get("sha256", ""), "data.sha256"),
            probes,
            read_evidence(h, t, len(targets), len(layers)),
            read_list(h.get("source_routed", []), "source_routed", read_int),
            read_list(h.get("flag_drops", []), "flag_drops", read_float),
        )
        check_routing(rec)
    except ValueError as exc:  # e.g. input_range of the wrong length
        raise fail(str(exc)) from exc
    _check_classes(rec)
    return rec


def _check_classes(rec: FitRecord) -> None:
    """Every class number the record names lies in [0, n_classes): the readers index
    per-class arrays with them."""
    d = rec.detection
    named = {
        "targets": [*rec.sources, *(s for v in rec.sources.values() for s in v)],
        "scores": [c for v in rec.scores.values() for e in v for c in (e.source, e.target)],
        "detection": [
            *(c for p in (*d.pair_families, *d.detected_pairs, *d.all_to_all) for c in p),
            *d.all_to_one,
            *d.intrinsic,
            *d.natural,
            *d.natural_dropped,
            *(c for i in d.intrinsic.values() for c in (*i.pair_sizes, *i.kept, *i.dropped)),
        ],
        "triggers": [c for tr in rec.triggers for c in (tr.target, *tr.sources)],
    }
    if rec.n_classes < 1:
        raise fail("n_classes is not a positive number")
    for what, classes in named.items():
        bad = [c for c in classes if c is not None and not 0 <= c < rec.n_classes]
        if bad:
            raise fail(f"{what} name class {bad[0]}, outside 0..{rec.n_classes - 1}")


def load(path: str | Path) -> FitRecord:
    """Read, check and validate a fit file."""
    return read(artifact.load(path))

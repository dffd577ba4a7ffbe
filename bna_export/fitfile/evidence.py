"""The fit file's evidence for a report (:class:`~bna_export.fitfile.records.Evidence`): its
header part (``evidence``: the model's hash, its audit) and tensors (``divergence.floor``,
``.before``, ``.after``), written and read here for :mod:`bna_export.fitfile.layout`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..audit import Audit, Finding
from ..errors import FitFileError
from .fields import get, read_bool, read_dict, read_list, read_str
from .records import Evidence

_SHA_DIGITS = set("0123456789abcdef")
_PARTS = ("floor", "before", "after")


def evidence_header(ev: Evidence) -> dict[str, Any]:
    return {
        "model_sha256": ev.model_sha256,
        "audit": None if ev.audit is None else ev.audit.to_json(),
        "divergence": ev.divergence,
    }


def evidence_tensors(ev: Evidence) -> dict[str, np.ndarray]:
    return {f"divergence.{k}": np.asarray(getattr(ev, k), np.float32) for k in _PARTS}


def _finding(v: Any, what: str) -> Finding:
    d = read_dict(v, what)
    return Finding(
        read_str(get(d, "node", what), f"{what}.node"),
        read_str(get(d, "op", what), f"{what}.op"),
        read_str(get(d, "reason", what), f"{what}.reason"),
        read_list(d.get("constants", []), f"{what}.constants", read_str),
    )


def _audit(v: Any) -> Audit | None:
    if v is None:
        return None
    w = "evidence.audit"
    d = read_dict(v, w)
    found = Audit(
        read_list(get(d, "findings", w), f"{w}.findings", _finding),
        read_list(get(d, "detached_outputs", w), f"{w}.detached_outputs", read_str),
    )
    if read_bool(get(d, "clean", w), f"{w}.clean") != found.clean:
        raise FitFileError("fit file: malformed header (evidence.audit.clean disagrees)")
    return found


def _divergence(v: Any) -> str:
    kind = read_str(v, "evidence.divergence")
    if kind not in ("tv", "js", "kl"):
        raise FitFileError(f"fit file: malformed header (evidence.divergence {kind!r})")
    return kind


def _sha(v: Any) -> str | None:
    if v is None:
        return None
    s = read_str(v, "evidence.model_sha256")
    if len(s) != 64 or not set(s) <= _SHA_DIGITS:
        raise FitFileError("fit file: malformed header (evidence.model_sha256 is not a SHA-256)")
    return s


def read_evidence(
    header: Mapping[str, Any], tensors: Mapping[str, np.ndarray], n_targets: int, n_layers: int
) -> Evidence | None:
    """The evidence of a fit file, or None when it was written before ``report`` existed."""
    if "evidence" not in header:
        return None
    d = read_dict(header["evidence"], "evidence")
    parts = []
    for key in _PARTS:
        name = f"divergence.{key}"
        arr = tensors.get(name)
        if arr is None or arr.shape != (n_targets, n_layers):
            got = "missing" if arr is None else f"shape {arr.shape}"
            want = (n_targets, n_layers)
            raise FitFileError(f"fit file: tensor {name!r} is {got}; expected shape {want}")
        parts.append(np.asarray(arr, np.float64))
    return Evidence(
        _sha(get(d, "model_sha256", "evidence")),
        _audit(get(d, "audit", "evidence")),
        _divergence(get(d, "divergence", "evidence")),
        *parts,
    )

"""Checking a built graph against what it was built from: rebuild it from the model and the
fit file and compare the bytes (a build is deterministic), what a deploy pipeline runs before
it ships."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .. import __version__, artifact
from ..errors import BadInputError, FitFileError, ModelError
from ..onnxfile import model_sha256
from .build import build_graph


@dataclass(frozen=True)
class Verified:
    """The answer of :func:`verify_built`: ``identical``, and why not in one line."""

    identical: bool
    reason: str
    built_sha256: str
    rebuilt_sha256: str | None


def _said(data: bytes) -> dict[str, str] | None:
    """The metadata a built graph says it was built from; None when it does not parse."""
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return {p.key: p.value for p in proto.metadata_props}


def _why(built: bytes, model_path: str | Path, fit_path: str | Path) -> str:
    said = _said(built)
    if said is None:
        return "it is not a readable ONNX graph"
    if "bna.fit_sha256" not in said:
        return "it is not a graph made by `bna-export build`"
    if said.get("bna.tool_version") != __version__:
        return f"it was built by bna-export {said.get('bna.tool_version')}, this is {__version__}"
    fit_hash = hashlib.sha256(Path(fit_path).read_bytes()).hexdigest()
    given = {"bna.model_sha256": model_sha256(model_path), "bna.fit_sha256": fit_hash}
    for key, what in (("bna.model_sha256", "model"), ("bna.fit_sha256", "fit file")):
        if said.get(key) != given[key]:
            was = (said.get(key) or "nothing")[:12]
            return f"it was built from another {what} (sha256 {was}…, given {given[key][:12]}…)"
    return "its bytes differ from a fresh build of the same model and fit file"


def verify_built(
    built_path: str | Path,
    model_path: str | Path,
    fit_path: str | Path,
    allow_graph_logic: bool = False,
) -> Verified:
    """Rebuild from ``model_path`` and ``fit_path`` and compare with ``built_path``'s bytes.
    A model or fit file that cannot be rebuilt from is a failed check, not an error; only an
    unreadable ``built_path`` raises (:class:`BadInputError`)."""
    try:
        built = Path(built_path).read_bytes()
    except OSError as exc:
        raise BadInputError(f"{built_path}: cannot read ({exc.strerror or exc})") from exc
    built_hash = hashlib.sha256(built).hexdigest()
    try:
        fit = artifact.load(fit_path)
        rebuilt = build_graph(model_path, fit, allow_graph_logic=allow_graph_logic).data
    except (ModelError, FitFileError) as exc:
        return Verified(False, f"cannot be rebuilt from these inputs: {exc}", built_hash, None)
    rebuilt_hash = hashlib.sha256(rebuilt).hexdigest()
    if rebuilt == built:
        return Verified(True, "identical to a fresh build", built_hash, rebuilt_hash)
    return Verified(False, _why(built, model_path, fit_path), built_hash, rebuilt_hash)

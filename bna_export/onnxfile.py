"""Reading an untrusted ONNX file: the protobuf only, and external data only from files inside
the model's own folder (no absolute paths, no ``..``, no symlinks out, sizes checked); and a
graph made by ``build``, as bytes for :func:`bna_export.runtime.open_built`; and the hash of a
model with its external data (:func:`model_sha256`, the built graph's provenance)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BadInputError, ModelError
from .runtime import F_LOGITS, looks_built


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _check_external(model: onnx.ModelProto, folder: Path, source: str) -> None:
    """Refuse external data that points outside ``folder`` or past the end of its file."""
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_entries(tensor)
        location = info.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise ModelError(
                f"{source}: tensor {tensor.name!r} keeps its data at {location!r}, outside "
                "the model's folder; refusing to read it"
            )
        path = folder / rel
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise ModelError(
                f"{source}: tensor {tensor.name!r} keeps its data in {location!r}, which "
                "leads outside the model's folder; refusing to read it"
            )
        if not path.is_file():
            raise ModelError(f"{source}: external data file {location!r} is missing")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError as exc:
            raise ModelError(f"{source}: tensor {tensor.name!r}: bad offset/length") from exc
        size = path.stat().st_size
        if offset < 0 or offset > size or (length is not None and offset + length > size):
            raise ModelError(
                f"{source}: tensor {tensor.name!r} reads past the end of {location!r}; "
                "the external data file is truncated"
            )


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model: initializers, node attributes, subgraphs, local functions."""
    out: list[onnx.TensorProto] = []

    def nodes(ns: Iterable[onnx.NodeProto]) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    out.append(a.t)
                out.extend(a.tensors)
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    out.extend(sub.initializer)
                    nodes(sub.node)

    out.extend(model.graph.initializer)
    nodes(model.graph.node)
    for function in model.functions:
        nodes(function.node)
    return out


def load_proto(path: str | Path) -> onnx.ModelProto:
    """The model's protobuf with its external data read in (checked first)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelError(f"{source}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ModelError(f"{source}: not a readable ONNX model ({exc})") from exc
    if not model.graph.node:
        raise ModelError(f"{source}: not a readable ONNX model (no graph)")
    _check_external(model, path.parent, source)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{source}: cannot read its external data ({exc})") from exc
    return model


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a model as deployed: its ``.onnx`` file's bytes, then for each external-data
    file it names (sorted by location) a zero byte, the location, a zero byte and the file's
    bytes. Read with the checks of :func:`load_proto`."""
    path = Path(path)
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    _check_external(proto, path.parent, str(path))
    digest = hashlib.sha256(data)
    locations = {
        _external_entries(t).get("location", "")
        for t in _all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    for location in sorted(locations):
        digest.update(b"\0" + location.encode() + b"\0")
        digest.update((path.parent / location).read_bytes())
    return digest.hexdigest()


def is_built(path: str | Path) -> bool:
    """Whether an ONNX file is a graph made by ``build`` (its outputs and metadata)."""
    proto = load_proto(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    return looks_built([o.name for o in proto.graph.output], meta)


def load_built(path: str | Path, with_f_logits: bool = False) -> bytes:
    """A graph made by ``build``, read with the checks of :func:`load_proto`, as bytes;
    ``with_f_logits`` also exposes f's own logits (named by the ``bna.f_logits`` metadata)
    as a fourth output."""
    proto = load_proto(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    if not looks_built([o.name for o in proto.graph.output], meta):
        raise BadInputError(f"{path}: not a graph made by `bna-export build`")
    if with_f_logits and meta[F_LOGITS] not in [o.name for o in proto.graph.output]:
        proto.graph.output.append(onnx.ValueInfoProto(name=meta[F_LOGITS]))
    return proto.SerializeToString()

"""A Triton Inference Server model repository for a built graph: ``DIR/<name>/1/model.onnx``
and a ``config.pbtxt`` for the ONNX Runtime backend with dynamic batching."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx

from .errors import BadInputError

_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Dimensions after the batch dimension (-1 where symbolic)."""
    dims = value.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def _tensor(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in _TYPES:
        raise BadInputError(f"tensor {value.name!r} has an ONNX type Triton config cannot name")
    dims = _dims(value)
    text = f'    name: "{value.name}"\n    data_type: {_TYPES[elem]}\n'
    if dims:
        return text + f"    dims: [ {', '.join(map(str, dims))} ]"
    # a per-sample scalar ([N] in the graph): Triton wants dims [ 1 ] reshaped to a scalar
    return text + "    dims: [ 1 ]\n    reshape: { shape: [ ] }"


def triton_config(model: bytes, name: str, max_batch_size: int = 64) -> str:
    """The ``config.pbtxt`` of a built graph (inputs and outputs read from the graph)."""
    graph = onnx.load_from_string(model).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    blocks = []
    for key, values in (("input", inputs), ("output", list(graph.output))):
        body = ",\n".join("  {\n" + _tensor(v) + "\n  }" for v in values)
        blocks.append(f"{key} [\n{body}\n]")
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n" + "\n".join(blocks) + "\ndynamic_batching { }\n"
        "instance_group [ { count: 1, kind: KIND_AUTO } ]\n"
    )


def write_triton_repo(root: str | Path, name: str, model: bytes, max_batch_size: int = 64) -> Path:
    """Write (or replace) ``root/<name>`` with version 1 of ``model``; returns its folder.
    The folder is assembled beside its final place and renamed in, so a failure leaves
    nothing half-written."""
    root = Path(root)
    if not name or "/" in name or name.startswith("."):
        raise BadInputError(f"--triton-name {name!r}: a plain folder name is needed")
    root.mkdir(parents=True, exist_ok=True)
    config = triton_config(model, name, max_batch_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(model)
        (tmp / "config.pbtxt").write_text(config)
        final = root / name
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
            final.rename(old / name)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

"""ONNX Runtime sessions with an explicit execution provider, and batched inference of a built
graph (its outputs ``label``, ``triggered``, ``logits``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
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


def is_built(path: str | Path) -> bool:
    """Whether an ONNX file is a graph made by ``build`` (its outputs and metadata)."""
    from .graph.load import load_proto  # graph imports this module

    proto = load_proto(path)
    meta = {p.key for p in proto.metadata_props}
    outputs = [o.name for o in proto.graph.output]
    return outputs == ["label", "triggered", "logits"] and "bna.f_logits" in meta


def open_built(
    path: str | Path, provider: Provider = "cpu", with_f_logits: bool = False
) -> tuple[ort.InferenceSession, dict[str, str]]:
    """A session on a graph made by ``build`` and its metadata; ``with_f_logits`` also
    exposes f's own logits (named by the ``bna.f_logits`` metadata) as a fourth output."""
    from .graph.load import load_proto  # graph imports this module

    proto = load_proto(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    outputs = [o.name for o in proto.graph.output]
    if outputs != ["label", "triggered", "logits"] or "bna.f_logits" not in meta:
        raise BadInputError(f"{path}: not a graph made by `bna-export build`")
    if with_f_logits:
        proto.graph.output.append(onnx.ValueInfoProto(name=meta["bna.f_logits"]))
    return session(proto.SerializeToString(), provider), meta


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

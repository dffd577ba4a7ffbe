"""Running f's ONNX graph on the fit file's probe inputs with every intermediate tensor exposed:
what finds the fit's layers in the graph (:mod:`.locate`) and tells batch-major tensors from
the rest (:mod:`.cut`). One ONNX Runtime session (CPU, no graph optimisation, so every tensor is
computed as the graph says) serves a whole build; each batch's results are kept."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ModelError


def _exposed_names(graph: onnx.GraphProto) -> list[str]:
    """Every named tensor of the top-level graph: its inputs and every node's outputs."""
    names = [v.name for v in graph.input]
    names += [o for node in graph.node for o in node.output if o]
    return list(dict.fromkeys(names))


class ProbeRunner:
    """f's tensors by name on the probes ``x`` (or their first ``rows`` rows). The session
    exposes every tensor; a run fetches only the tensors asked for (so it holds no more than
    they take), and each tensor of each batch is computed once."""

    def __init__(self, proto: onnx.ModelProto, x: np.ndarray) -> None:
        self.proto = proto
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self._session: ort.InferenceSession | None = None
        self._names: set[str] = set()
        self._runs: dict[int | None, dict[str, np.ndarray]] = {}

    def _open(self) -> ort.InferenceSession:
        if self._session is None:
            model = onnx.ModelProto()
            model.CopyFrom(self.proto)
            names = _exposed_names(model.graph)
            self._names = set(names)
            del model.graph.output[:]
            model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # ORT raises its own exception types
                raise ModelError(f"ONNX Runtime cannot run the model: {exc}") from exc
        return self._session

    def values(self, names: Sequence[str], rows: int | None = None) -> list[np.ndarray]:
        """The tensors ``names`` on the probes (all of them, or the first ``rows``)."""
        sess = self._open()
        missing = [n for n in names if n not in self._names]
        if missing:
            raise ModelError(f"tensor {missing[0]!r} is not in the model's top-level graph")
        run = self._runs.setdefault(rows, {})
        todo = list(dict.fromkeys(n for n in names if n not in run))
        if todo:
            x = self.x if rows is None else self.x[:rows]
            try:
                out = sess.run(todo, {sess.get_inputs()[0].name: x})
            except Exception as exc:  # ORT raises its own exception types
                raise ModelError(f"ONNX Runtime cannot run the model: {exc}") from exc
            run.update(zip(todo, out, strict=True))
        return [run[n] for n in names]

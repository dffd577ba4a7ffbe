"""The parts of a fit file that the mitigated classifier needs, checked against the model it is
applied to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..artifact import FitFile
from ..errors import ModelError
from ..norm import BnaModel
from .layout import read
from .records import FitRecord, Layer, Routing


@dataclass
class Mitigation:
    """The parts of a fit file that the mitigated classifier needs."""

    targets: list[int]
    thetas: list[torch.Tensor]
    n_classes: int
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    layers: tuple[Layer, ...] = ()
    model_format: str = "torch"
    routing: Routing | None = None
    """How g_t's answers become the routed ones (None: the paper's rule; FitRecord.routing)."""

    @classmethod
    def from_record(cls, rec: FitRecord) -> Mitigation:
        return cls(
            rec.targets,
            [torch.from_numpy(np.array(la.theta)) for la in rec.layers],
            rec.n_classes,
            rec.input_shape,
            rec.input_range,
            rec.layers,
            rec.model_format,
            rec.routing,
        )

    @classmethod
    def from_fit(cls, fit: FitFile) -> Mitigation:
        return cls.from_record(read(fit))

    def check_model(self, model: BnaModel) -> None:
        """Fail unless ``model`` has the BN layers (same statistics) the fit was made on. A
        measured layer (an ONNX model's Conv/Gemm output) takes the fit file's statistics, so
        that h works in the units Θ was fitted in."""
        if self.model_format != model.source:
            kinds = {"onnx": "an .onnx file", "torch": "a .pt2 or a PyTorch module"}
            made = kinds.get(self.model_format, self.model_format)
            raise ModelError(
                f"the fit file was made from {made} and this model is "
                f"{kinds.get(model.source, model.source)}: evaluate with the kind of model it was "
                "fitted on, or `build` the graph and evaluate that"
            )
        if len(self.layers) != len(model.layers):
            raise ModelError(
                f"the fit file has {len(self.layers)} BatchNorm layers, the model "
                f"{len(model.layers)}: this is not the model that was fitted"
            )
        for i, (rec, la) in enumerate(zip(self.layers, model.layers, strict=True)):
            if la.measured and rec.measured and rec.name == la.name and rec.channels == la.channels:
                la.set_statistics(torch.from_numpy(rec.running_mean), torch.from_numpy(rec.weight))
                continue
            if (
                la.measured
                or rec.channels != la.channels
                or not np.allclose(rec.running_mean, la.running_mean.numpy(), rtol=1e-5, atol=1e-6)
            ):
                raise ModelError(
                    f"BatchNorm layer {i} ({rec.name}) differs from the fit "
                    "file's: this is not the model that was fitted"
                )

"""The fit side of ONNX: f's ONNX graph as a differentiable PyTorch module, for
``fit --model model.onnx``."""

from .module import OnnxModule, bn_sites

__all__ = ["OnnxModule", "bn_sites"]

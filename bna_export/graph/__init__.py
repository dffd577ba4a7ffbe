"""The ONNX side: find the fit's BN layers in f's graph, add every g_t and the routing, and
check the result against the PyTorch reference (design, "Built graph"); and f's ONNX graph as
a differentiable PyTorch module for ``fit --model model.onnx``."""

from .build import Built, build_graph
from .load import load_proto
from .to_torch import OnnxModule, bn_sites

__all__ = ["Built", "OnnxModule", "bn_sites", "build_graph", "load_proto"]

"""The ONNX rewriter: find the fit's BN layers in f's graph, add every g_t and the routing, and
check the result against the PyTorch reference (design, "Built graph")."""

from .build import Built, build_graph
from .load import load_proto

__all__ = ["Built", "build_graph", "load_proto"]

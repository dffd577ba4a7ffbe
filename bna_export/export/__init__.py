"""The export side: find the fit's BN layers in f's ONNX graph, add every g_t and the routing,
and check the result against the fit file's reference before anything is written (design,
"Built graph")."""

from .build import Built, build_graph

__all__ = ["Built", "build_graph"]

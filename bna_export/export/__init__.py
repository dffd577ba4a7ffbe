"""The export side: find the fit's BN layers in f's ONNX graph, add every g_t and the routing,
and check the result against the fit file's reference before anything is written (design,
"Built graph"); and verify a built graph by rebuilding it."""

from .build import Built, build_graph
from .verify import Verified, verify_built

__all__ = ["Built", "Verified", "build_graph", "verify_built"]

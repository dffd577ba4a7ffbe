"""A Conv layer's clip as two Relu'd 1x1 depthwise Convs.

clip(y, L, H) = H − Relu((H − L) − Relu(y − L)): the Conv computes A·y + c − L (its bias shifted
by −L), then Relu, a depthwise Conv computing (H − L) − ·, Relu, and a depthwise Conv computing
H − ·. ONNX Runtime fuses every one of these into its blocked convolutions, where a per-channel
Max/Min would break them up.

Cases handled: a Conv with a constant weight (and bias, if any) whose output has rank 4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..fold import why_not_foldable
from .base import Site

if TYPE_CHECKING:
    from ..clone import Clone


class ClipAsDepthwise:
    name: ClassVar[str] = "clip-as-depthwise-conv"

    def match(self, site: Site) -> bool | None:
        node = site.node
        return True if node.op_type == "Conv" and len(node.inputs) >= 2 and site.rank == 4 else None

    def check(self, site: Site, match: bool) -> str | None:
        return why_not_foldable(site.node, site.channels)

    def rewrite(self, clone: Clone, site: Site, match: bool) -> None:
        aff, b, tag = site.affine, clone.b, f"{site.out.name}/{clone.tag}"
        y = clone.fold_conv(site.node, aff.a, aff.c - aff.low)
        y = b.one("Relu", [y], f"{tag}/above_low")
        y = clone.depthwise(y, aff.high - aff.low, f"{tag}/below_high")
        y = b.one("Relu", [y], f"{tag}/below_high_relu")
        clone.map[id(site.out)] = clone.depthwise(y, aff.high, f"{tag}/clipped")

"""The affine map folded into the layer's producer, then a per-channel Max and Min.

Cases handled: a BatchNormalization node with one output (scale and variance constant), a Conv
(constant weight, and bias if any), a Gemm (constant B, C per output column, β ≠ 0); see
:mod:`..fold` for the maths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..fold import why_not_foldable
from .base import Site, clip_per_channel

if TYPE_CHECKING:
    from ..clone import Clone


class FoldThenClip:
    name: ClassVar[str] = "fold-then-clip"

    def match(self, site: Site) -> bool | None:
        return True if site.node.op_type in ("BatchNormalization", "Conv", "Gemm") else None

    def check(self, site: Site, match: bool) -> str | None:
        return why_not_foldable(site.node, site.channels)

    def rewrite(self, clone: Clone, site: Site, match: bool) -> None:
        y = clone.fold(site.node, site.affine, site.theta)
        clone.map[id(site.out)] = clip_per_channel(clone, site, y)

"""Any other producer: a copy of it, then y·A + c as a per-channel Mul and Add, then a
per-channel Max and Min. It takes every layer (the last rule tried).

Cases handled: any node whose output is a fit layer's (e.g. an Add after which a BN was folded
away, a Conv whose weight is computed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..builder import channel_shape
from .base import Site, clip_per_channel

if TYPE_CHECKING:
    from ..clone import Clone


class ScaleShiftThenClip:
    name: ClassVar[str] = "scale-shift-then-clip"

    def match(self, site: Site) -> bool:
        return True

    def check(self, site: Site, match: bool) -> str | None:
        return None

    def rewrite(self, clone: Clone, site: Site, match: bool) -> None:
        b, tag = clone.b, f"{site.out.name}/{clone.tag}"
        y = clone.copy(site.node)[list(site.node.outputs).index(site.out)]
        shape = channel_shape(site.channels, site.rank)
        scale, shift = site.affine.a.reshape(shape), site.affine.c.reshape(shape)
        y = b.one("Mul", [y, b.const(f"{tag}/scale", scale)], f"{tag}/mul")
        y = b.one("Add", [y, b.const(f"{tag}/shift", shift)], f"{tag}/add")
        clone.map[id(site.out)] = clip_per_channel(clone, site, y)

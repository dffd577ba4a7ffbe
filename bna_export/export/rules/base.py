"""What a layer rule sees (:class:`Site`) and what it is (:class:`LayerRule`): ``match`` finds the
structure it rewrites around a fit layer's output, ``check`` says in a few words why it cannot
rewrite this one (None: it can), ``rewrite`` adds g_t's nodes for the layer to the clone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from ..builder import channel_shape
from ..fold import Affine

if TYPE_CHECKING:
    from ..clone import Clone


@dataclass(frozen=True)
class Site:
    """A fit layer's output ``out`` in f, the node that computes it, and g_t's layer there."""

    node: ir.Node
    out: ir.Value
    theta: np.ndarray
    """[4, C]: µ', σ', υ, ω of this layer for this target."""
    affine: Affine
    rank: int

    @property
    def channels(self) -> int:
        return len(self.affine.a)


class LayerRule(Protocol):
    name: ClassVar[str]

    def match(self, site: Site) -> Any | None:
        """The structure this rule rewrites at ``site``, or None."""

    def check(self, site: Site, match: Any) -> str | None:
        """Why this rule cannot rewrite ``site`` (None: it can)."""

    def rewrite(self, clone: Clone, site: Site, match: Any) -> None:
        """Add g_t's nodes for the layer; ``clone.map`` then takes ``site.out`` to them."""


def clip_per_channel(clone: Clone, site: Site, y: ir.Value) -> ir.Value:
    """max(min(y, H), L) per channel as a Max and a Min against [C, 1, …] constants."""
    b, tag = clone.b, f"{site.out.name}/{clone.tag}"
    shape = channel_shape(site.channels, site.rank)
    low, high = site.affine.low.reshape(shape), site.affine.high.reshape(shape)
    y = b.one("Max", [y, b.const(f"{tag}/low", low)], f"{tag}/max")
    return b.one("Min", [y, b.const(f"{tag}/high", high)], f"{tag}/min")

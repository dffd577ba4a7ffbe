"""The rewrite rules of a fit layer in g_t, one per module, tried in :data:`RULES` order: the
first whose ``match`` finds its structure and whose ``check`` passes rewrites the layer."""

from .base import LayerRule, Site
from .clip_as_depthwise import ClipAsDepthwise
from .clip_into_next import ClipIntoNextLayer
from .fold_then_clip import FoldThenClip
from .scale_shift_then_clip import ScaleShiftThenClip

RULES: tuple[LayerRule, ...] = (
    ClipIntoNextLayer(),
    ClipAsDepthwise(),
    FoldThenClip(),
    ScaleShiftThenClip(),
)

__all__ = ["RULES", "LayerRule", "Site"]

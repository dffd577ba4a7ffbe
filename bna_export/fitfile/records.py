"""The fit file's content as typed, frozen records: what every reader of a fit file uses (the
header layout and tensor names that hold them are :mod:`bna_export.fitfile.layout`'s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audit import Audit
from .fields import fail


@dataclass(frozen=True)
class Layer:
    """One BN layer (or measured Conv/Gemm output) of f, its Θ for every target, and its
    fingerprint: the probes' per-channel means, which find the layer again in an ONNX graph."""

    index: int
    name: str
    channels: int
    eps: float
    measured: bool
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    theta: np.ndarray
    """[targets, 4, channels]: µ, σ, υ, ω per channel."""
    probe_mean: np.ndarray | None = None
    """[probes, channels]; absent in fit files written before ``build`` existed."""


@dataclass(frozen=True)
class Trigger:
    """A reverse-engineered trigger of a target (per-target estimate or sweep pair)."""

    index: int
    family: str
    target: int
    sources: tuple[int, ...]
    restart: int
    refresh_round: int
    size: float
    relative_size: float
    success: float
    steps: int
    used: bool
    """Θ was fitted on it."""
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PairScore:
    """One pair's (or, without a sweep, one trigger's) size, statistic and anomaly score."""

    source: int | None
    target: int
    size: float
    statistic: float
    score: float | None
    """None: not scored (no sweep), or an infinite score (MAD = 0)."""
    detected: bool | None
    weight: float | None = None
    """A screened sweep's weight of the pair in the weighted medians."""


@dataclass(frozen=True)
class Intrinsic:
    """The intrinsic-backdoor check of a target with several detected sources."""

    family: str
    pooled_size: float | None
    pair_sizes: dict[int, float]
    ratios: dict[str, float | None]
    kept: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class Detection:
    """How the pairs were scored and what was found (empty when targets or pairs were given)."""

    rule: str
    normalise: str
    consistency: float
    threshold: float
    side: str
    scores_computed: bool
    pair_families: dict[tuple[int, int], str]
    detected_pairs: tuple[tuple[int, int], ...]
    all_to_one: dict[int, str]
    target_scores: dict[str, tuple[float | None, ...]]
    pooled_scores: dict[str, tuple[float | None, ...]]
    pooled_sizes: dict[str, tuple[float | None, ...]]
    intrinsic: dict[int, Intrinsic]
    sweep: dict[str, Any]
    """``exhaustive``, ``problems``, ``problem_steps`` and ``screen`` (what the screen found)."""
    all_to_all: tuple[tuple[int, int], ...] = ()
    """The pairs the all-to-all rule found (empty in fit files written before it)."""
    natural: dict[int, dict[str, float]] = field(default_factory=dict)
    """The natural-feature check (:mod:`bna_export.natural`): per all-to-one target it checked,
    each family's alignment (empty in fit files written before it)."""
    natural_dropped: tuple[int, ...] = ()
    """The targets it dropped as natural hubs, not backdoors."""


@dataclass(frozen=True)
class Probes:
    """Inputs with what f, every g_t and the routed classifier answered: ``build`` checks its
    graph against them."""

    x: np.ndarray
    f_logits: np.ndarray
    g_logits: np.ndarray
    label: np.ndarray
    triggered: np.ndarray
    logits: np.ndarray
    truth: np.ndarray | None = None
    """[probes] each input's true class (None in fit files written before ``report``)."""
    trigger_of: np.ndarray | None = None
    """[probes] the target whose first trigger is embedded in the input, -1 for a clean one."""


@dataclass(frozen=True)
class Evidence:
    """What a security report shows beside the fit (None in fit files written before
    ``report``): the model's identity, its graph audit, and how far each target's trigger moves
    every BN layer before and after Θ (:mod:`bna_export.layer_divergence`)."""

    model_sha256: str | None
    """The fitted model file's SHA-256 (an .onnx with its external data, as
    :func:`bna_export.onnxfile.model_sha256`; a .pt2's bytes); None for a Python module."""
    audit: Audit | None
    """An ONNX model's graph audit (:mod:`bna_export.audit`); None for a PyTorch model."""
    divergence: str
    """The D of the values below (the fit's ``fit.divergence``)."""
    floor: np.ndarray
    """[targets, layers] the same images without their triggers through f: sampling alone."""
    before: np.ndarray
    """[targets, layers] mean over channels of D(p || q), the trigger through f."""
    after: np.ndarray
    """[targets, layers] the same through g_t."""


@dataclass(frozen=True)
class FitRecord:
    """Everything one ``fit`` wrote."""

    tool_version: str
    mode: str
    """'detect' (no hint), 'targets' or 'pairs'."""
    n_classes: int
    model_format: str
    """'torch' (a .pt2 or a module) or 'onnx'."""
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    sources: dict[int, tuple[int, ...]]
    """S(t) per target, in target order."""
    families: dict[int, str]
    scores: dict[str, tuple[PairScore, ...]]
    detection: Detection
    triggers: tuple[Trigger, ...]
    layers: tuple[Layer, ...]
    settings: dict[str, Any]
    history: tuple[float, ...]
    data_images: int
    data_sha256: str
    probes: Probes | None = None
    """None in fit files written before ``build`` existed."""
    evidence: Evidence | None = None
    source_routed: tuple[int, ...] = ()
    """Targets whose g_t answers only t or one of S(t) (an all-to-all map's): design step 3
    with g_t's argmax taken over those classes."""
    flag_drops: tuple[float, ...] = ()
    """Per target, :attr:`Routing.drops` (empty in fit files written before it: all 0)."""

    @property
    def targets(self) -> list[int]:
        return list(self.sources)

    @property
    def answers(self) -> list[tuple[int, ...] | None]:
        """Per target, the classes g_t may answer besides t (None: any)."""
        return routed_answers(self.sources, self.source_routed)

    @property
    def routing(self) -> Routing:
        """How the routed answers follow from f's and every g_t's logits."""
        drops = self.flag_drops or (0.0,) * len(self.sources)
        return Routing(tuple(self.answers), tuple(drops))

    @property
    def attacked(self) -> bool:
        return bool(self.sources)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(s, t) for t, v in self.sources.items() for s in v]


def routed_answers(
    sources: Mapping[int, Sequence[int]], source_routed: Sequence[int]
) -> list[tuple[int, ...] | None]:
    """Per target of ``sources``, its sources where it is routed among them, else None (any)."""
    return [tuple(sources[t]) if t in source_routed else None for t in sources]


@dataclass(frozen=True)
class Routing:
    """How g_t's answers become the routed ones (design step 3), per target of a fit: an image
    f answers t is flagged when g_t's answer among ``answers`` is not t and t's lead over the
    best other of those classes fell by more than ``drops`` from f's logits to g_t's."""

    answers: tuple[tuple[int, ...] | None, ...]
    """The classes g_t may answer besides t (None: any)."""
    drops: tuple[float, ...]
    """The fall of t's lead that a flag needs (0: none, the paper's rule; ``fit.flag_drop``)."""


def check_routing(rec: FitRecord) -> None:
    """The routing fields name targets, and every drop is a finite number ≥ 0, one a target."""
    if not set(rec.source_routed) <= set(rec.sources):
        raise fail("source_routed names a class that is not a target")
    drops = rec.flag_drops
    if drops and (len(drops) != len(rec.sources) or not all(0 <= d < np.inf for d in drops)):
        raise fail("flag_drops is not one finite number >= 0 per target")

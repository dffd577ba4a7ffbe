"""Every tunable of the method, as frozen dataclasses holding the paper's defaults. Each field
is documented once, here; the code reads settings and never hard-codes a constant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import BadInputError

Divergence = Literal["tv", "js", "kl"]
TriggerType = Literal["patch", "perturbation", "blend", "warp", "both"]


@dataclass(frozen=True)
class HistogramSettings:
    """Sigmoid-soft histograms of one neuron's activations (paper Sec. 5, Eq. 5-6)."""

    bin_width: float = 0.1
    """Δb, width of every finite bin; bins run from the clean minimum to the clean maximum."""
    tau: float = 150.0  # τ, sigmoid scale of the soft bin edges (paper: line search, 150)
    window: int = 2
    """Bins on each side of a sample's own bin that it may touch; with τ·Δb = 15 the mass it
    leaves out is below σ(-15·window) ≈ 1e-13 per sample."""
    chunk: int = 1 << 20  # samples per chunk of the windowed scatter, to bound memory


@dataclass(frozen=True)
class ReverseSettings:
    """Trigger reverse-engineering (Neural Cleanse for patches, Xiang et al. 2020 for additive)."""

    steps: int = 1000
    """Most optimisation steps per problem (most stop far earlier: a perturbation at its first
    success, a patch once it stops shrinking)."""
    batch_size: int = 32
    """Clean images per problem per step; a problem with fewer images (one class of 20) sees
    all of them every step."""
    max_problems: int = 512
    """Problems solved at once (more are solved in consecutive groups, with the same
    estimates): their parameters, Adam moments, best and gradient copies take about
    (8C + 5)·H·W floats each, e.g. 60 MB for 512 problems at 3×32×32, 3 GB at 3×224×224."""
    images_per_forward: int = 512
    """Images per forward pass of f (problems are chunked to this): bounds memory, and on CPU
    a few hundred images per pass is as fast per image as any larger batch."""
    lr: float = 0.1
    """Adam step size on the unconstrained (tanh) mask and pattern parameters."""
    perturbation_step: float = 0.02
    """Length of each normalised gradient step of the perturbation v, as a share of hi - lo
    (Xiang et al. 2020: v grows from 0 until the trigger succeeds)."""
    perturbation_init: float = 0.001
    """Standard deviation of v's random start, as a share of hi - lo."""
    warp_step: float = 0.3
    """Length (L2 over its 2·4·4 pixel offsets) of each normalised step of a warp trigger's
    control grid, which grows from near 0 until the trigger succeeds, as a perturbation does:
    about 0.03 px of RMS displacement per step (0.05 took 665 steps to reach 3 px)."""
    warp_steps: int = 300
    """The most steps of a warp problem: a backdoor warp succeeds within tens of steps, and on
    models without one the flow wanders below ``warp_limit`` (MobileNetV2 test model: 1,000
    steps to 2 px, 2.5 % success)."""
    warp_limit: float = 3.0
    """A warp that has not succeeded by this RMS displacement (pixels) is given up: a backdoor
    warp is imperceptible (WaNet's s = 0.5-1: 0.3-0.7 px here), larger ones are other classes'
    shapes; without it a model without a warp backdoor ran its warps to the step cap."""
    blend_pixels: bool = False
    """Whether λ multiplies a blend's α·H·W (a patch mask's mass, α at every pixel) instead of
    α. The sweep uses it: with α alone λ is H·W times weaker than a patch's and every blend
    problem runs to the cap; with α·H·W it reaches the success boundary within about 100 steps
    (README, Detection). Per-target estimates keep α: a blend at the boundary is a weaker
    trigger to fit Θ on (DenseNet test model from ONNX: ASR 12-14 % instead of ≤ 10 %)."""
    blend_steps: int = 1000
    """The most steps of a blend problem (rounded up to a success check); the sweep's is 150: on
    six digits models its blend scores were those at 300 within their spread (README, Detection)."""
    success: float = 0.95
    """A trigger succeeds when this share of the problem's images reaches the target."""
    confidence: float = 0.0
    """An image reaches t only where f gives t at least this probability (0: f's answer is t).
    0.9 in the sweep widened the patch margins on digits but moved others (README, Detection)."""
    init_cost: float = 1e-2
    """Weight λ of the patch size penalty once the trigger first succeeds (λ is 0 before, as
    in Neural Cleanse). Neural Cleanse's 1e-3 needs ~300 more steps to reach the boundary; 1e-2
    converged on digits and the synthetic sets within the step budget to similar sizes."""
    cost_patience: int = 3  # checks in a row with (without) success before λ grows (shrinks)
    cost_multiplier: float = 1.5  # λ's growth factor on success (its 1.5th power shrinks it)
    check_every: int = 10  # steps between success checks, λ updates and patch early stops
    patience: int = 5  # early stop after this many checks without a 1% smaller success
    min_steps: int = 100  # never stop a patch problem before this many steps
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    """f's passes in float32, bfloat16 (autocast; weights and triggers stay float32), or auto
    (bfloat16 where native: AVX512-BF16/AMX CPUs, bf16 GPUs). bfloat16: the sweep 2.4× faster on
    such a CPU, the patch sizes noisier (12-class test sets: one of 8 all-to-all pairs lost, a
    false pair added; README)."""
    restarts: int = 1
    """Independent trigger estimates per target and family for fitting; the fit uses those of
    the families ``family_rule`` keeps. With two families, 2 took digits patch A2O ASR from
    5.2% to 2.8%; with four the estimates are diverse already, and 1 halves the cost (README)."""


SWEEP = ReverseSettings(steps=300, perturbation_step=0.04, blend_pixels=True, blend_steps=150)
"""The pair sweep's solver (detection needs comparable sizes, not the best estimate): at most 300
steps per patch problem (1000 stop at 370-520 steps within 2% on digits) and perturbation steps
twice as long (sizes to ±0.04); the same pairs and margins on the digits panel (README)."""


REFRESH = ReverseSettings(steps=100, min_steps=30, restarts=1)
"""The solver of the triggers refreshed against g_t in the Θ fit (``fit.refresh_every``): warm
started from the triggers in use, so a short run of the per-target solver."""


@dataclass(frozen=True)
class FitSettings:
    """Fitting Θ_t = {µ, σ, υ, ω} per BN channel (paper Sec. 4.2, Eq. 3)."""

    divergence: Divergence = "tv"
    """D(p||q): total variation (paper's default), Jensen-Shannon or Kullback-Leibler."""
    epochs: int = 100
    """Passes over the source images, each with one of t's triggers (drawn anew every pass);
    the paper ran 30 on 100 images a class; on 20 a class 30 are 90 Adam steps, too few."""
    lr: float = 0.03
    """Adam step size (paper: 0.01 on raw µ, σ; here µ, σ move in units of σ₀, where 0.01
    left 45-90% ASR on digits after 30 epochs)."""
    batch_size: int = 64
    """Triggered source images per target per step (each with one of t's estimated triggers);
    with the model's size and input size this bounds the fit's peak memory."""
    samples_per_channel: int = 2048
    """Samples of each BN channel per target per step that q is made of: (image, position)
    pairs of the step's triggered images, drawn uniformly without replacement and shared by
    the layer's channels (all of them when there are fewer). An unbiased estimate of the
    step's histogram at a cost that follows channels, not pixels; see README, Θ fit cost."""
    clean_samples_per_channel: int = 16384
    """Samples of each BN channel per target that p is made of (positions drawn uniformly)."""
    images_per_pass: int = 64
    """Clean images per pass when measuring f's statistics: bounds the BN outputs held at once."""
    targets_per_pass: int = 16
    """Targets fitted together (one batch of (batch_size + target_batch) images per target per
    step); more are fitted in consecutive groups, so memory stays bounded for all-to-all
    attacks on many classes."""
    target_batch: int = 64
    """Images per target per step in the keep-t term: clean images of t, plain or with one of
    t's estimated triggers, taken in turn from a shuffled list of every such pair (0: all of
    them every step)."""
    target_ce_weight: float = 5.0
    """Weight of the cross-entropy that keeps g_t's answer t on clean target-class images, so
    that clean images of t are not flagged (the paper's objective has no such term; 0 = off:
    digits FPR 19-33%, with it 3-5%; 5 with the stronger trigger copies of trigger_scales,
    which flag more clean images of t at 3: README, Θ fit)."""
    target_flag_budget: float = 0.0
    """Share of the defender's clean target images (those f answers t for) that g_t may flag:
    while more are flagged the keep-t weight is multiplied by ``target_weight_step`` per step,
    else divided by it (within ``target_weight_range``); 0 = a fixed weight."""
    target_weight_step: float = 1.05  # factor of each step of the adaptive keep-t weight
    target_weight_range: float = 4.0
    """The adaptive keep-t weight stays within target_ce_weight / range and · range."""
    single_source_budget: float = 0.05
    """``target_flag_budget`` of the targets with one source, whose keep-t weight only grows (0:
    off): fitted on one class, g_t learns its look and flags clean t (README, one-source targets)"""
    single_source_range: float = 16.0
    """... and their keep-t weight grows to at most this many times ``target_ce_weight``."""
    keep_margin: float = 3.0
    """For the flag budgets a kept image counts as flagged while g_t's logit of its class leads
    the next by less than this (0: when g_t's answer differs): g_t keeps all 20 seen images of t
    and flags unseen ones, so its answer alone gives the budget nothing to act on (README)."""
    target_triggered: bool = True
    """Also keep g_t's answer t on clean target images with t's estimated trigger embedded:
    the trigger alone must not flip an image away from its true class."""
    jitter: int = 2
    """Random shift (pixels) of the target images in the keep-t term, to generalise from few."""
    source_ce_weight: float = 5.0
    """Weight of a cross-entropy sending g_t's answer on triggered source images back to their
    source class, whose labels the defender has (not in the paper, whose divergence alone left
    45-90% ASR on digits; 0 = off; 2 until the fit ran 100 epochs: README, Θ fit)."""
    clean_ce_weight: float = 0.0
    """Weight of a cross-entropy keeping g_t's answers on clean source images (0 = off)."""
    map_shared: bool = True
    """The targets of the all-to-all map rule share one Θ, fitted on the sweep's universal
    triggers whose map fires on their pooled sources, every one's clean images kept at their
    own class: one trigger moves every class, so one correction, learnt from all the classes'
    images (a per-target Θ learns one source's look and flags its target's clean images)."""
    map_routing: bool = True
    """Their g_t answers t or its map source, whichever it prefers (design step 3 over those
    two classes), not any class: a clean t it doubts stays t (README, all-to-all routing)."""
    flag_drop: float = 0.6
    """g_t flags an image f answers t only when t's lead over the next class it may answer falls,
    from f's logits to g_t's, by more than this share of f's median lead on the defender's
    clean images of t (0: when its answer is not t, the paper's rule; README, flag drop)."""
    trigger_scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    """Strengths at which each estimated trigger is embedded for q (mask, clipped to 1, or
    perturbation times the scale): an estimate is the *smallest* trigger that works, a real one
    stronger (small ResNet patch, known target: ASR 9-12% with (1,), 3-4% with (1, 2, 3))."""
    blend_limit: float = 0.3
    """Stronger copies of a blend estimate stop at this α (never below the estimate): a larger
    blend is mostly the target's look (digits CNN patch: ASR 7.0 → 1.4 %; README). 1 = none."""
    patch_widen: float = 0.5
    """A patch estimate's copy at scale s also grows by ⌊(s − 1)·this⌋ pixels (its pattern
    spread by the mask-weighted mean of its neighbours; 0.5: the scale-3 copy by one): an
    estimate is the smallest part of a patch that fires, Θ must stop all of it (README, Θ fit)."""
    patch_compact: float = 0.4  # ... if this share of it is in one square (README, Θ fit)
    patch_grow_from: float = 4.0  # ... and it has this many pixels (fewer: a whole trigger)
    learn: Literal["all", "clip"] = "all"
    """Learn µ, σ, υ, ω (paper, 'all') or only the clip bounds υ, ω with f's µ, σ ('clip')."""
    clip_init: Literal["clean", "wide"] = "clean"  # υ, ω from each channel's clean range, or wide
    wide_clip: float = 10.0  # initial |υ|, |ω| for clip_init='wide'
    kl_eps: float = 1e-6  # floor added to bin probabilities inside log for KL and JS
    refresh_every: int = 0
    """Every this many epochs, re-estimate each target's triggers against the current g_t
    (warm-started from the ones in use, ``refresh`` solver) and add those that still send the
    source images to t: the fit then learns from the triggers its Θ does not yet stop (0 =
    off; README, Θ fit)."""
    refresh_success: float = 0.5
    """A refreshed trigger joins the fit when it sends at least this share of the pooled
    source images to t on g_t."""
    refresh_growth: float = 0.0
    """... and when it is at most this many times the size of the trigger it started from (a
    much larger trigger is the target's own features, which g_t must keep; 0 = no limit)."""


@dataclass(frozen=True)
class DetectSettings:
    """Anomaly detection over class pairs (MAD, Neural Cleanse / paper appendix C)."""

    mad_threshold: float = 7.0
    """Anomaly-score threshold (paper: 7; 3 for warping triggers)."""
    consistency: float = 1.4826
    """MAD scale for a normal-consistent estimate of the standard deviation."""
    normalise: Literal["source", "none"] = "source"
    """Divide each pair's trigger size by the median size of its source's triggers before
    taking the reciprocal ('source'), or not ('none', the paper): see README, Detection."""
    target_rule: bool = True
    """Also detect a target whose pair statistics are high as a column (all-to-one rule)."""
    pooled_rule: bool = True
    """Also solve, per family and target, one trigger on the pooled images of every other class
    and detect a target whose 1 / size is an outlier among the targets' (Neural Cleanse's own
    test; K more problems per family, each seeing ``sweep.batch_size`` images per step)."""
    pooled_families: int = 2
    """The pooled and vote rules need a target in this many of the sweep's families (all when
    fewer): patch strokes draw an 8 from any digit of the clean small ResNet (README)."""
    vote_rule: bool = True  # the vote rule (bna_export/target_rules.py; README, Detection)
    vote_share: float = 2 / 3  # it needs this share of the sources' smallest triggers to name t
    pooled_vote: bool = True  # a pooled outlier stands for the vote rule's second family (README)
    map_share: float = 0.5  # in the map rule a class counts when this share of it goes to d(c)
    min_effect: float = 1.5
    """The pair, column and vote rules need the pair's or target's triggers this many times
    smaller than their sources' typical one (bna_export.detect.effects; README, Detection)."""
    all_to_all_rule: bool = True  # the all-to-all rule (bna_export/detect.py; README, Detection)
    all_to_all_bar: float = 0.5  # a source's best pair counts from this share of the threshold
    all_to_all_sources: float = 0.5  # it and the map rule fire when this share of sources count
    map_rule: bool = True  # the all-to-all map rule (bna_export/universal.py; README, Detection)
    map_complete: bool = True  # a fired map's classes left out go where no counted class goes
    map_starts: int = 2  # the universal problem also starts from each family's n best pairs
    restarts: int = 1  # trigger estimates per pair and family in the sweep (the smallest scored)
    screen_above: int = 15
    """Up to this many classes the sweep solves every ordered pair (K·(K−1) problems per
    family); above, it screens first (bna_export/sweep.py): about K·(1 + m + r) + k·(K − 1),
    0.7× every pair at K = 10, 0.08× at 100. At K = 10 the screen missed the small digits
    ResNet's all-to-one target and 2 of 4 all-to-all pairs (README, a sweep that scales)."""
    screen_candidates: int = 2
    """m: targets per source from its untargeted screen (the classes its way out reaches most)."""
    screen_references: int = 3
    """r: other targets per source drawn at random; they stand for the unsolved pairs of their
    source (weighted medians). 2 left a false pair (a 6 → 8 perturbation scored 7.2) on the
    small digits ResNet that 3 did not."""
    screen_targets: int = 1
    """k: the targets that are candidates of the most sources, all of whose pairs are solved
    (all-to-one suspects), besides any that half the sources name."""
    natural_alignment: float = 2.0
    """The natural-feature check drops a pooled or vote rule's target when every estimate of its
    trigger that succeeds moves the features this much toward t's own (bna_export/natural.py;
    above 1, the default: off; README, Detection: at 0.3 it drops backdoors to other targets)."""
    intrinsic_ratio: float = 2.0
    """Intrinsic-backdoor check: a target's sources are not one backdoor when the trigger on
    their pooled images is over this many times the largest per-pair one (paper: 27.18 vs 7.95)."""


@dataclass(frozen=True)
class Settings:
    """All settings of one `fit` run; recorded in the fit file's header."""

    histogram: HistogramSettings = field(default_factory=HistogramSettings)
    reverse: ReverseSettings = field(default_factory=ReverseSettings)
    """The solver of the per-target trigger estimates, which Θ is fitted on."""
    sweep: ReverseSettings = field(default_factory=lambda: SWEEP)
    """The solver of the pair sweep (detection only: it needs comparable sizes, not the best
    estimate): :data:`SWEEP`."""
    refresh: ReverseSettings = field(default_factory=lambda: REFRESH)
    """The solver of the triggers re-estimated against g_t during the Θ fit: :data:`REFRESH`."""
    fit: FitSettings = field(default_factory=FitSettings)
    detect: DetectSettings = field(default_factory=DetectSettings)
    trigger_type: TriggerType = "both"
    """Trigger families to reverse-engineer: one family by name, or 'both' (the name is the
    original method's two families): every family of ``families`` for the per-target
    estimates and of ``detect_families`` for the sweep, because the defender does not know."""
    families: tuple[str, ...] = ("patch", "perturbation", "blend", "warp")
    """The families of the per-target trigger estimates Θ is fitted on (bna_export/families.py):
    diverse estimates of an unknown trigger generalise to it (README, Θ fit)."""
    detect_families: tuple[str, ...] = ("patch", "perturbation", "blend")
    """The families of the pair sweep: each adds K·(K − 1) problems; a pair is detected when it
    is an outlier in any of them (README, Detection)."""
    family_rule: Literal["smallest", "successful"] = "successful"
    """With trigger_type 'both': fit on every family whose trigger succeeds ('successful'), or
    only on the family with the smallest relative successful trigger ('smallest'): digits,
    known target, seed 0, ASR chessboard 52% → 21%, pixel 19% → 16%, at twice the Θ-fit time."""
    seed: int = 0
    """Seed of every random choice (sampling, initialisation)."""
    channels_last: bool = True
    """Run f's convolutions channels-last when f allows it (the same logits to 1e-4 on the clean
    images): oneDNN's fast path, 1.2-1.5x faster on 2 CPU cores; float rounding changes only."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        defaults = cls()
        kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in kinds:
                continue
            if is_dataclass(sub := kinds[key]):
                sub_known = {f.name for f in fields(sub)}
                value = sub(**{k: v for k, v in value.items() if k in sub_known})
            kwargs[key] = value
        return cls(**kwargs)


def for_fit(
    *,
    trigger_type: TriggerType = "both",
    seed: int = 0,
    divergence: Divergence = "tv",
    epochs: int = FitSettings.epochs,
    restarts: int = ReverseSettings.restarts,
    mad_threshold: float = DetectSettings.mad_threshold,
    overrides: Sequence[str] = (),
) -> Settings:
    """The settings of a ``fit`` run: the defaults with the command line's options, then its
    ``--set SECTION.FIELD=VALUE`` overrides."""
    base = Settings()
    settings = replace(
        base,
        trigger_type=trigger_type,
        seed=seed,
        fit=replace(base.fit, divergence=divergence, epochs=epochs),
        reverse=replace(base.reverse, restarts=restarts),
        detect=replace(base.detect, mad_threshold=mad_threshold),
    )
    return with_overrides(settings, overrides)


def _parse(raw: str, owner: Any, name: str, key: str) -> Any:
    """``raw`` read as the type of the setting ``owner.name``."""
    like, text = getattr(owner, name), raw.strip()
    hint = get_type_hints(type(owner))[name]
    try:
        if get_origin(hint) is Literal:
            if text not in get_args(hint):
                raise ValueError
            return text
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(like, (int, float)):
            return type(like)(text)
        if isinstance(like, tuple):
            items = [v.strip() for v in text.split(",") if v.strip()]
            if like and isinstance(like[0], str):
                return tuple(items)
            return tuple(float(v) for v in items)
    except ValueError as exc:
        expected = (
            " or ".join(get_args(hint)) if get_origin(hint) is Literal else type(like).__name__
        )
        raise BadInputError(f"setting {key}={raw!r}: expected {expected}") from exc
    return text


def with_overrides(settings: Settings, items: Sequence[str]) -> Settings:
    """Settings with ``section.field=value`` (or ``field=value`` for a top-level field)
    overrides applied, each value read as the type of the field it replaces."""
    for item in items:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        owner = settings if len(path) == 1 else getattr(settings, path[0], None)
        name = path[-1]
        if (
            not sep
            or len(path) > 2
            or not is_dataclass(owner)
            or name not in {f.name for f in fields(owner)}
            or is_dataclass(getattr(owner, name))
        ):
            raise BadInputError(
                f"--set {item!r}: expected SECTION.FIELD=VALUE naming a setting of "
                "bna_export/settings.py (e.g. reverse.steps=500, detect.mad_threshold=5)"
            )
        changed = replace(owner, **{name: _parse(raw, owner, name, key)})
        settings = changed if len(path) == 1 else replace(settings, **{path[0]: changed})
    return settings

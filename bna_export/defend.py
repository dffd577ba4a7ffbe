"""The fitting pipeline: from a model and the defender's clean set to a fit file.

Nothing known (design step 1): reverse-engineer a trigger for every ordered class pair in every
family (one batch, sharded over ``torchrun`` ranks), score the pairs (:mod:`bna_export.detect`),
and take the detected pairs P, targets T and sources S(t); re-estimate one trigger per target on
the pooled images of S(t) and drop the sources that do not share it (intrinsic-backdoor check).
Targets known (``targets``) or pairs known (``pairs``): start from there. Then, per target,
choose the family, fit Θ_t for all targets in one batch, and record everything the later steps
need (detection scores, layers, Θ, triggers, probe inputs with f's and every g_t's logits).
Nothing detected: the fit file says so and holds no Θ; everything downstream serves f.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import fitfile
from .artifact import FitFile
from .data import Dataset
from .detect import Detection
from .distributed import Shard
from .errors import BadInputError, ModelError
from .estimates import ROUND, Job, StageProgress, find_backdoors, refresher
from .families import FAMILIES
from .fit import fit_thetas
from .layer_divergence import layer_divergence
from .natural import natural_targets, target_alignments
from .norm import BnaModel
from .record import make_record
from .reverse import TriggerEstimate, choose_family, succeeds
from .settings import Settings
from .sweep import SweepResult
from .target_rules import intrinsic_check
from .universal import as_target, map_group


def model_output_classes(model: BnaModel, x: np.ndarray) -> int:
    """Number of classes K: the width of f's logits on the first images of x."""
    with torch.no_grad():
        out = model(torch.from_numpy(x[:2]).to(model.device))
    if out.dim() != 2:
        raise ModelError(f"the model returns shape {tuple(out.shape)}; expected [N, K] logits")
    return int(out.shape[1])


def default_input_range(x: np.ndarray) -> tuple[float, float]:
    """[0, 1], widened to the data's own range when the data leaves it."""
    return float(min(0.0, x.min())), float(max(1.0, x.max()))


def resolve_sources(
    n_classes: int, targets: Sequence[int] | None, pairs: Sequence[tuple[int, int]] | None
) -> dict[int, list[int]]:
    """S(t) for every target: all other classes (targets) or the given pairs' sources."""
    if (targets is None) == (pairs is None):
        raise BadInputError("give exactly one of --targets and --pairs")
    bad = [c for c in (targets or []) if not 0 <= c < n_classes]
    bad += [c for p in (pairs or []) for c in p if not 0 <= c < n_classes]
    if bad:
        raise BadInputError(
            f"class {bad[0]} does not exist: the model has {n_classes} classes "
            f"(0 to {n_classes - 1})"
        )
    if targets is not None:
        if n_classes < 2:
            raise BadInputError("the model has fewer than 2 classes")
        return {t: [c for c in range(n_classes) if c != t] for t in sorted(set(targets))}
    out: dict[int, list[int]] = {}
    for s, t in pairs or []:
        if s == t:
            raise BadInputError(f"pair {s}:{t} has the same source and target")
        out.setdefault(t, [])
        if s not in out[t]:
            out[t].append(s)
    return {t: sorted(v) for t, v in sorted(out.items())}


@dataclass
class FitOutcome:
    """What :func:`fit_defence` made: the fit file and its record, the triggers it used per
    target, and the detection over all pairs (None when targets or pairs were given)."""

    fit: FitFile
    record: fitfile.FitRecord
    triggers: dict[int, list[TriggerEstimate]]
    detection: Detection | None = None


def fit_defence(
    model: BnaModel,
    data: Dataset,
    *,
    targets: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    settings: Settings = Settings(),
    input_range: tuple[float, float] | None = None,
    progress: StageProgress | None = None,
    shard: Shard = Shard(),
) -> FitOutcome | None:
    """Find the backdoor (or take the given targets or pairs) and fit Θ_t for each target.

    With ``shard`` (one ``torchrun`` rank of several) every rank solves its share of each
    reverse-engineering step; rank 0 fits Θ and returns the outcome, the others return None.
    """
    torch.manual_seed(settings.seed)
    model.use_channels_last(torch.from_numpy(data.x[:8]), settings.channels_last)
    n_classes = model_output_classes(model, data.x)
    detecting = targets is None and pairs is None
    sources = {} if detecting else resolve_sources(n_classes, targets, pairs)
    needed = (
        range(n_classes) if detecting else {*sources, *(s for v in sources.values() for s in v)}
    )
    lo, hi = _check_data(data, n_classes, sorted(needed), input_range)
    families, swept = _families(settings)
    job = Job(model, data, families, (lo, hi), settings, shard, progress)

    sweep = None
    if detecting:
        sweep = find_backdoors(job, n_classes, swept)
        sources = sweep.detection.sources
    # a pair's sweep estimate stands for a one-source target; the pooled ones, solved with the
    # sweep's solver, do not stand for the per-target estimates Θ is fitted on
    singles = [] if sweep is None else sweep.estimates
    known = {e.problem: e for e in singles if len(e.problem.sources) == 1}
    estimates = job.per_target(sources, known)
    if sweep is not None:
        sources = _intrinsic_check(sweep, sources, estimates, settings)
        changed = {t for t in sources if sources[t] != sweep.detection.sources[t]}
        if changed:
            estimates = [e for e in estimates if e.problem.target not in changed]
            estimates += job.per_target({t: sources[t] for t in sorted(changed)}, known)
    if not shard.primary:
        return None
    if sweep is not None:
        sources = _natural_check(model, data, sweep, sources, estimates, (lo, hi), settings)
        estimates = [e for e in estimates if e.problem.target in sources]
    tlist = list(sources)
    chosen: dict[int, list[TriggerEstimate]] = {}
    for t in tlist:
        chosen[t] = _pick([e for e in estimates if e.problem.target == t], (lo, hi), settings)
    group, fired = [], []
    if sweep is not None and settings.fit.map_shared:
        group, fired = map_group(sweep.maps, sources, settings.detect)
    if group:  # one Θ for the all-to-all targets, fitted on the universal triggers whose map
        # fired (the sweep's: re-solved with the per-target solver, shorter perturbation steps
        # run longer, one sent only 2 of 10 classes where the backdoor does; README)
        chosen[group[0]] = [sweep.maps[f]["estimate"] for f in fired]
    pooled = tuple(sorted({s for t in group for s in sources[t]}))
    if tlist:
        # Θ's per-sample transforms and spatial sampling run faster on the default layout
        model.use_channels_last(torch.from_numpy(data.x[:8]), enable=False)
        fitted = [t for t in tlist if t not in group[1:]]
        result = fit_thetas(
            model,
            data,
            fitted,
            {**sources, **({group[0]: pooled} if group else {})},
            chosen,
            (lo, hi),
            settings.fit,
            settings.histogram,
            seed=settings.seed,
            progress=None if progress is None else (lambda d, n: progress("fit", d, n, "")),
            refresh=refresher(job, sources),
            keep={group[0]: group} if group else None,
        )
        row = [fitted.index(group[0] if t in group else t) for t in tlist]
        thetas, history = [th[row] for th in result.thetas], result.history
        chosen = {t: result.triggers[group[0] if t in group else t] for t in tlist}
        for t in group:  # the universal trigger, recorded as each group target's own
            chosen[t] = [as_target(e, t, sources[t]) for e in chosen[t]]
        fresh = [e for t in tlist for e in chosen[t] if t in group or e.problem.restart >= ROUND]
        estimates = estimates + fresh
    else:  # nothing detected: no Θ, f is served unchanged
        thetas = [torch.zeros((0, 4, la.channels)) for la in model.layers]
        history = []
    moved = layer_divergence(
        model, data, tlist, sources, chosen, thetas, (lo, hi), settings.fit, settings.histogram,
        seed=settings.seed,
    )  # fmt: skip
    mode = "detect" if detecting else ("targets" if pairs is None else "pairs")
    record = make_record(
        model,
        data,
        settings,
        n_classes,
        (lo, hi),
        sources,
        estimates,
        chosen,
        thetas,
        history,
        mode=mode,
        divergence=moved,
        sweep=sweep,
        source_routed=group if settings.fit.map_routing else (),
    )
    return FitOutcome(fitfile.to_fit(record), record, chosen, sweep.detection if sweep else None)


def _pick(
    mine: list[TriggerEstimate], input_range: tuple[float, float], settings: Settings
) -> list[TriggerEstimate]:
    """The estimates of one target that Θ is fitted on: those of the family
    :func:`~bna_export.reverse.choose_family` picks, or (``family_rule``: successful) every
    one that succeeds."""
    best = choose_family(mine, input_range, settings.reverse.success)
    chosen = [e for e in mine if e.family == best.family]
    if settings.family_rule == "successful":
        ok = [e for e in mine if succeeds(e, settings.reverse.success)]
        chosen = ok or chosen
    return chosen


def _check_data(
    data: Dataset,
    n_classes: int,
    needed: Sequence[int],
    input_range: tuple[float, float] | None,
) -> tuple[float, float]:
    """Fail on data that cannot be used with this model; returns the input range."""
    if n_classes < 2:
        raise BadInputError("the model has fewer than 2 classes")
    if data.y.max() >= n_classes:
        raise BadInputError(
            f"label {int(data.y.max())} in the data but the model has {n_classes} classes"
        )
    counts = np.bincount(data.y, minlength=n_classes)
    empty = [c for c in needed if counts[c] == 0]
    if empty:
        raise BadInputError(
            f"class {empty[0]} has no clean image in the data; BNA needs "
            "clean images of every source and target class"
        )
    lo, hi = input_range if input_range is not None else default_input_range(data.x)
    if not lo < hi:
        raise BadInputError(f"input range {lo},{hi} is empty")
    if data.x.min() < lo - 1e-6 or data.x.max() > hi + 1e-6:
        raise BadInputError(
            f"data lies in [{data.x.min():.3g}, {data.x.max():.3g}], outside "
            f"the input range [{lo:g}, {hi:g}]; pass --input-range"
        )
    return lo, hi


def _families(settings: Settings) -> tuple[list[str], list[str]]:
    """The families of the per-target estimates and of the sweep (``trigger_type`` one family:
    that one for both)."""
    if settings.trigger_type != "both":
        return [settings.trigger_type], [settings.trigger_type]
    for name in (*settings.families, *settings.detect_families):
        if name not in FAMILIES:
            raise BadInputError(f"trigger family {name!r}: expected one of {', '.join(FAMILIES)}")
    if not settings.families or not settings.detect_families:
        raise BadInputError("families and detect_families need at least one trigger family")
    return list(settings.families), list(settings.detect_families)


def _intrinsic_check(
    sweep: SweepResult,
    sources: dict[int, list[int]],
    estimates: Sequence[TriggerEstimate],
    settings: Settings,
) -> dict[int, list[int]]:
    """Keep, per target with several detected sources, only those that share one trigger.

    The pooled trigger is compared with the per-pair ones in each family, and the family where
    the sources look most alike decides (one shared trigger in any family is one backdoor). A
    pooled trigger that does not succeed counts as infinitely large.
    """
    out = {}
    for t, srcs in sources.items():
        if len(srcs) < 2:
            out[t] = srcs
            continue
        checks = []
        for fam, z in sweep.sizes.items():
            pooled = min(
                (
                    e.size
                    for e in estimates
                    if e.problem.target == t
                    and e.family == fam
                    and succeeds(e, settings.reverse.success)
                ),
                default=float("inf"),
            )
            # the sources whose pair this family reached (a pair not reached has no size)
            pair_sizes = {s: float(z[s, t]) for s in srcs if np.isfinite(z[s, t])}
            if pair_sizes:
                checks.append((pooled / max(pair_sizes.values()), fam, pooled, pair_sizes))
        if not checks:  # no family measured these pairs: nothing to compare with
            out[t] = srcs
            continue
        _, fam, pooled, pair_sizes = min(checks, key=lambda c: (c[0], c[1]))
        kept = intrinsic_check(pair_sizes, pooled, settings.detect.intrinsic_ratio)
        out[t] = srcs if len(kept) == len(pair_sizes) else kept
        sweep.intrinsic[t] = fitfile.Intrinsic(
            family=fam,
            pooled_size=pooled if np.isfinite(pooled) else None,
            pair_sizes=pair_sizes,
            ratios={c[1]: c[0] if np.isfinite(c[0]) else None for c in checks},
            kept=tuple(out[t]),
            dropped=tuple(s for s in srcs if s not in out[t]),
        )
    return out


def _natural_check(
    model: BnaModel,
    data: Dataset,
    sweep: SweepResult,
    sources: dict[int, list[int]],
    estimates: Sequence[TriggerEstimate],
    input_range: tuple[float, float],
    settings: Settings,
) -> dict[int, list[int]]:
    """Drop the all-to-one targets that only the pooled or vote rule found (several sources
    left after the intrinsic check, not the all-to-all rule's) whose triggers move the features
    toward the target's own (:mod:`bna_export.natural`): natural hubs, not backdoors."""
    det = sweep.detection
    a2a = {t for _, t in det.all_to_all}
    checked = [
        t
        for t in sources
        if t in det.all_to_one and t not in det.column and t not in a2a and len(sources[t]) > 1
    ]
    if not checked or settings.detect.natural_alignment > 1:  # a cosine never reaches it: off
        return sources
    mine = [e for e in estimates if e.problem.target in checked]
    sweep.natural = target_alignments(model, data, mine, input_range, settings.reverse.success)
    dropped = natural_targets(sweep.natural, settings.detect.natural_alignment)
    sweep.natural_dropped = tuple(dropped)
    return {t: v for t, v in sources.items() if t not in dropped}

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

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__, fitfile
from .artifact import FitFile
from .data import Dataset
from .detect import Detection, intrinsic_check
from .distributed import Shard, solve
from .errors import BadInputError, ModelError
from .families import FAMILIES
from .fit import Refresh, fit_thetas, g_logits, predict_mitigated
from .model import BnaModel
from .reverse import (
    Problem,
    TriggerEstimate,
    choose_family,
    relative_size,
    reverse_engineer,
    succeeds,
)
from .settings import Settings
from .sweep import SweepResult, run_sweep

StageProgress = Callable[[str, int, int, str], None]
"""progress(stage, done, total, note); stages: 'screen' (one untargeted problem per source, many
classes only), 'sweep' (class pairs), 'reverse' (per target), 'fit' (Θ); ``note`` says what is
done in words (e.g. '37/90 pairs')."""

PROBES_PER_CLASS = 2
PROBES_PER_TARGET = 4


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


def _pairs_progress(
    problems: Sequence[Problem], progress: StageProgress | None, shard: Shard, stage: str
) -> Callable[[int, int, torch.Tensor], None] | None:
    """Turn the solver's per-problem progress into 'pairs done' (of this rank's problems'
    source-target pairs; in the sweep, pooled targets counted apart) for the stage's bar."""
    if progress is None:
        return None
    mine = shard.mine(len(problems))
    keys = sorted({(problems[i].sources, problems[i].target) for i in mine})
    slot = {k: j for j, k in enumerate(keys)}
    pair_of = torch.tensor([slot[(problems[i].sources, problems[i].target)] for i in mine])
    index = torch.tensor(mine, dtype=torch.int64)
    what = "pairs" if stage == "sweep" else "problems"
    pooled = torch.tensor([stage == "sweep" and len(k[0]) > 1 for k in keys], dtype=torch.bool)
    n_pooled = int(pooled.sum())

    def report(done: int, total: int, finished: torch.Tensor) -> None:
        left = torch.zeros(len(keys)).index_add_(0, pair_of, (~finished[index]).float())
        ready = left == 0
        text = f"{int((ready & ~pooled).sum())}/{len(keys) - n_pooled} {what}"
        if n_pooled:
            text += f", {int((ready & pooled).sum())}/{n_pooled} pooled targets"
        progress(stage, done, total, text)

    return report


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
    job = _Job(model, data, families, (lo, hi), settings, shard, progress)

    sweep = None
    if detecting:
        sweep = _find_backdoors(job, n_classes, swept)
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
    tlist = list(sources)
    chosen: dict[int, list[TriggerEstimate]] = {}
    for t in tlist:
        mine = [e for e in estimates if e.problem.target == t]
        best = choose_family(mine, (lo, hi), settings.reverse.success)
        chosen[t] = [e for e in mine if e.family == best.family]
        if settings.family_rule == "successful":
            ok = [e for e in mine if succeeds(e, settings.reverse.success)]
            chosen[t] = ok or chosen[t]
    if tlist:
        # Θ's per-sample transforms and spatial sampling run faster on the default layout
        model.use_channels_last(torch.from_numpy(data.x[:8]), enable=False)
        result = fit_thetas(
            model,
            data,
            tlist,
            sources,
            chosen,
            (lo, hi),
            settings.fit,
            settings.histogram,
            seed=settings.seed,
            progress=None if progress is None else (lambda d, n: progress("fit", d, n, "")),
            refresh=_refresher(job, sources),
        )
        thetas, history = result.thetas, result.history
        fresh = [e for t in tlist for e in result.triggers[t] if e.problem.restart >= _ROUND]
        estimates, chosen = estimates + fresh, result.triggers
    else:  # nothing detected: no Θ, f is served unchanged
        thetas = [torch.zeros((0, 4, la.channels)) for la in model.layers]
        history = []
    mode = "detect" if detecting else ("targets" if pairs is None else "pairs")
    record = _record(
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
        sweep=sweep,
    )
    return FitOutcome(fitfile.to_fit(record), record, chosen, sweep.detection if sweep else None)


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


@dataclass
class _Job:
    """What every reverse-engineering call of one fit shares."""

    model: BnaModel
    data: Dataset
    families: list[str]
    input_range: tuple[float, float]
    settings: Settings
    shard: Shard
    progress: StageProgress | None

    def solve(
        self,
        problems: Sequence[Problem],
        progress: Callable[[int, int, torch.Tensor], None] | None,
        sweep: bool = False,
    ) -> list[TriggerEstimate]:
        """Estimates of ``problems`` with the sweep's solver settings (``sweep``) or the
        per-target ones."""
        s = self.settings
        return solve(
            self.model,
            self.data,
            problems,
            self.input_range,
            s.sweep if sweep else s.reverse,
            s.seed,
            self.shard,
            progress,
        )

    def per_target(
        self, sources: dict[int, list[int]], known: dict[Problem, TriggerEstimate]
    ) -> list[TriggerEstimate]:
        """Every family and restart of each target on its pooled sources; a problem that the
        sweep already solved (a target with one source) is not solved again."""
        problems = [
            Problem(f, t, tuple(v), r)
            for t, v in sources.items()
            for f in self.families
            for r in range(self.settings.reverse.restarts)
        ]
        todo = [p for p in problems if p not in known]
        report = self.progress
        fresh = self.solve(
            todo, None if report is None else (lambda d, n, _f: report("reverse", d, n, ""))
        )
        found = {**known, **dict(zip(todo, fresh, strict=True))}
        return [found[p] for p in problems]


_ROUND = 1000
"""A refreshed problem's restart number: its round times this plus the restart it came from,
so every round draws its own minibatches."""


def _refresher(job: _Job, sources: dict[int, list[int]]) -> Refresh:
    """The Θ fit's refresh (``fit.refresh_every``): each target's latest triggers, re-solved
    against g_t (the current Θ) from where they are, with the ``refresh`` solver; those that
    still send ``fit.refresh_success`` of the pooled sources to t, and moved, are returned."""
    s = job.settings
    latest: dict[int, list[TriggerEstimate]] = {}

    def refresh(targets, thetas, triggers, round_):
        base = {t: latest.get(t, list(triggers[t])) for t in targets}
        problems, start, route = [], [], []
        for i, t in enumerate(targets):
            for e in base[t]:
                r = round_ * _ROUND + e.problem.restart % _ROUND
                problems.append(Problem(e.family, t, tuple(sources[t]), r))
                start.append(e)
                route.append(i)
        index = torch.tensor(route, device=job.model.device)

        def g(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
            with job.model.mitigated(thetas, index[which]):
                return job.model(x)

        found = reverse_engineer(
            job.model, job.data, problems, job.input_range, s.refresh, s.seed, forward=g,
            start=start,
        )  # fmt: skip
        out: dict[int, list[TriggerEstimate]] = {}
        growth = s.fit.refresh_growth or float("inf")
        for t in targets:
            pairs = [(e, b) for e, b in zip(found, start, strict=True) if e.problem.target == t]
            latest[t] = [e for e, _ in pairs]
            out[t] = [
                e
                for e, b in pairs
                if e.success >= s.fit.refresh_success - 1e-9
                and e.size <= growth * b.size
                and not all(np.array_equal(e.params[k], b.params[k]) for k in e.params)
            ]
        return out

    return refresh


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


def _find_backdoors(job: _Job, n_classes: int, families: list[str]) -> SweepResult:
    """The pair sweep (or its screen) and the detection, before the intrinsic check."""

    def solve(problems: Sequence[Problem], stage: str) -> list[TriggerEstimate]:
        report = _pairs_progress(problems, job.progress, job.shard, stage)
        return job.solve(problems, report, sweep=True)

    return run_sweep(job.model, job.data, n_classes, families, job.input_range, job.settings, solve)


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


def _probe_inputs(
    data: Dataset,
    sources: dict[int, list[int]],
    chosen: dict[int, list[TriggerEstimate]],
    input_range: tuple[float, float],
    n_classes: int,
) -> np.ndarray:
    idx = np.concatenate([np.flatnonzero(data.y == c)[:PROBES_PER_CLASS] for c in range(n_classes)])
    parts = [data.x[idx]]
    for t, ests in chosen.items():
        src = data.of_classes(sources[t])[:PROBES_PER_TARGET]
        with torch.no_grad():
            parts.append(ests[0].apply(torch.from_numpy(data.x[src]), *input_range).numpy())
    return np.concatenate(parts).astype(np.float32)


def _scores(
    sweep: SweepResult | None, triggers: Sequence[fitfile.Trigger]
) -> dict[str, tuple[fitfile.PairScore, ...]]:
    """Per family, per pair: size, statistic, anomaly score and whether it was detected. With
    no sweep (targets or pairs given), the per-target triggers, unscored."""
    if sweep is None:
        return {
            f: tuple(
                fitfile.PairScore(
                    None if len(t.sources) != 1 else t.sources[0],
                    t.target,
                    t.size,
                    1.0 / max(t.size, 1e-12),
                    None,
                    None,
                )
                for t in triggers
                if t.family == f
            )
            for f in dict.fromkeys(t.family for t in triggers)
        }
    det = sweep.detection
    out = {}
    for f, z in sweep.sizes.items():
        st, sc = det.statistics[f], det.scores[f]
        out[f] = tuple(
            fitfile.PairScore(
                s,
                t,
                float(z[s, t]),
                float(st[s, t]),
                float(sc[s, t]) if np.isfinite(sc[s, t]) else None,
                det.family.get((s, t)) == f,
                None if sweep.weights is None else float(sweep.weights[f][s, t]),
            )
            for s, t in np.argwhere(~np.isnan(z)).tolist()
        )
    return out


def _detection(settings: Settings, sweep: SweepResult | None) -> fitfile.Detection:
    d = settings.detect
    det = None if sweep is None else sweep.detection
    return fitfile.Detection(
        rule="union",
        normalise=d.normalise,
        consistency=d.consistency,
        threshold=d.mad_threshold,
        side="large",
        scores_computed=sweep is not None,
        pair_families={} if det is None else dict(det.family),
        detected_pairs=() if det is None else tuple(tuple(p) for p in det.pairs),
        all_to_one={} if det is None else dict(det.all_to_one),
        target_scores={} if det is None else {f: tuple(v) for f, v in det.target_scores.items()},
        pooled_scores={} if det is None else {f: tuple(v) for f, v in det.pooled_scores.items()},
        pooled_sizes={} if sweep is None else {f: tuple(z) for f, z in sweep.pooled.items()},
        intrinsic={} if sweep is None else dict(sweep.intrinsic),
        sweep={}
        if sweep is None
        else {
            "exhaustive": sweep.weights is None,
            "problems": sweep.problems,
            "problem_steps": sweep.problem_steps,
            "screen": sweep.screen,
        },
    )


def _record(
    model: BnaModel,
    data: Dataset,
    settings: Settings,
    n_classes: int,
    input_range: tuple[float, float],
    sources: dict[int, list[int]],
    estimates: list[TriggerEstimate],
    chosen: dict[int, list[TriggerEstimate]],
    thetas: list[torch.Tensor],
    history: list[float],
    mode: str,
    sweep: SweepResult | None = None,
) -> fitfile.FitRecord:
    targets = list(sources)
    triggers = tuple(
        fitfile.Trigger(
            index=j,
            family=e.family,
            target=e.problem.target,
            sources=tuple(e.problem.sources),
            restart=e.problem.restart % _ROUND,
            refresh_round=e.problem.restart // _ROUND,
            size=e.size,
            relative_size=relative_size(e, input_range),
            success=e.success,
            steps=e.steps,
            used=any(e is u for u in chosen[e.problem.target]),
            params=dict(e.params),
        )
        for j, e in enumerate(estimates)
    )
    probes = _probe_inputs(data, sources, chosen, input_range, n_classes)
    with torch.no_grad(), model.capturing() as outputs:
        f_logits = model(torch.from_numpy(probes).to(model.device)).cpu().numpy()
    means = []  # each BN output's per-sample channel means: finds the layer again in an ONNX
    for out in outputs:  # graph, whatever the exporter folded
        z = torch.cat(out)
        means.append(z.reshape(len(z), z.shape[1], -1).mean(2).cpu().numpy())
    layers = tuple(
        fitfile.Layer(
            i,
            la.name,
            la.channels,
            la.eps,
            la.measured,
            *(
                getattr(la, k).cpu().numpy()
                for k in ("running_mean", "running_var", "weight", "bias")
            ),
            thetas[i].numpy(),
            means[i],
        )
        for i, la in enumerate(model.layers)
    )
    pred = predict_mitigated(model, targets, thetas, probes)
    return fitfile.FitRecord(
        tool_version=__version__,
        mode=mode,
        n_classes=n_classes,
        model_format=model.source,
        input_shape=tuple(data.x.shape[1:]),
        input_range=(float(input_range[0]), float(input_range[1])),
        sources={t: tuple(sources[t]) for t in targets},
        families={t: "+".join(sorted({e.family for e in chosen[t]})) for t in targets},
        scores=_scores(sweep, triggers),
        detection=_detection(settings, sweep),
        triggers=triggers,
        layers=layers,
        settings=settings.to_dict(),
        history=tuple(history),
        data_images=len(data),
        data_sha256=hashlib.sha256(data.x.tobytes() + data.y.tobytes()).hexdigest(),
        probes=fitfile.Probes(
            probes,
            f_logits,
            g_logits(model, thetas, len(targets), probes),
            pred.label,
            pred.triggered,
            pred.logits,
        ),
    )

"""From what a fit found and fitted to its fit-file record (:mod:`bna_export.fitfile`): probe
inputs with f's, every g_t's and the routed answers, every pair's size and anomaly score, the
detection, the triggers, and the layers with the fingerprints that find them in an ONNX graph."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from . import __version__, fitfile
from .data import Dataset, class_rank
from .estimates import ROUND
from .mitigated import flag_drops, g_logits, predict_mitigated
from .norm import BnaModel
from .reverse import TriggerEstimate, relative_size
from .settings import Settings
from .sweep import SweepResult
from .universal import universal_record

PROBES_PER_CLASS = 2
PROBES_PER_TARGET = 4


def _interleaved(data: Dataset, classes: Sequence[int]) -> np.ndarray:
    """The images of ``classes``, the first of each class, then the second of each, ...: a few
    probes show several sources."""
    idx = data.of_classes(list(classes))
    y = data.y[idx]
    return idx[np.lexsort((y, class_rank(y)))]


def _probe_inputs(
    data: Dataset,
    sources: dict[int, list[int]],
    chosen: dict[int, list[TriggerEstimate]],
    input_range: tuple[float, float],
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probe images, each one's true class, and the target whose first trigger is in it
    (-1: clean): ``PROBES_PER_CLASS`` clean images of every class, then ``PROBES_PER_TARGET``
    source images of every target (one per source class first) with its trigger."""
    idx = np.concatenate([np.flatnonzero(data.y == c)[:PROBES_PER_CLASS] for c in range(n_classes)])
    parts, truth, trigger_of = [data.x[idx]], [data.y[idx]], [np.full(len(idx), -1)]
    for t, ests in chosen.items():
        src = _interleaved(data, sources[t])[:PROBES_PER_TARGET]
        with torch.no_grad():
            parts.append(ests[0].apply(torch.from_numpy(data.x[src]), *input_range).numpy())
        truth.append(data.y[src])
        trigger_of.append(np.full(len(src), t))
    as_int = [np.concatenate(v).astype(np.int64) for v in (truth, trigger_of)]
    return np.concatenate(parts).astype(np.float32), *as_int


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


def _finite(per_family: dict[str, Sequence[float]]) -> dict[str, tuple[float | None, ...]]:
    """Per family, each value as a float, or None where it is not finite (as the fit file
    stores it)."""
    return {
        f: tuple(None if x is None or not np.isfinite(x) else float(x) for x in v)
        for f, v in per_family.items()
    }


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
        target_scores={} if det is None else _finite(det.target_scores),
        pooled_scores={} if det is None else _finite(det.pooled_scores),
        pooled_sizes={} if sweep is None else _finite(sweep.pooled),
        intrinsic={} if sweep is None else dict(sweep.intrinsic),
        all_to_all=() if det is None else tuple(det.all_to_all),
        natural={} if sweep is None else dict(sweep.natural),
        natural_dropped=() if sweep is None else tuple(sweep.natural_dropped),
        sweep={}
        if sweep is None
        else {
            "exhaustive": sweep.weights is None,
            "problems": sweep.problems,
            "problem_steps": sweep.problem_steps,
            "screen": sweep.screen,
            "universal": universal_record(sweep.maps),
        },
    )


def make_record(
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
    divergence: tuple[np.ndarray, np.ndarray, np.ndarray],
    sweep: SweepResult | None = None,
    source_routed: Sequence[int] = (),
) -> fitfile.FitRecord:
    """The record of a fit (``divergence``: :func:`~bna_export.layer_divergence.layer_divergence`
    of the fitted Θ, [targets, layers]: floor, before and after; ``source_routed``: the targets
    whose g_t answers only t or one of its sources)."""
    targets = list(sources)
    answers = fitfile.routed_answers(sources, source_routed)
    drops = flag_drops(model, data, targets, answers, settings.fit.flag_drop)
    routing = fitfile.Routing(tuple(answers), drops)
    triggers = tuple(
        fitfile.Trigger(
            index=j,
            family=e.family,
            target=e.problem.target,
            sources=tuple(e.problem.sources),
            restart=e.problem.restart % ROUND,
            refresh_round=e.problem.restart // ROUND,
            size=e.size,
            relative_size=relative_size(e, input_range),
            success=e.success,
            steps=e.steps,
            used=any(e is u for u in chosen[e.problem.target]),
            params=dict(e.params),
        )
        for j, e in enumerate(estimates)
    )
    probes, truth, trigger_of = _probe_inputs(data, sources, chosen, input_range, n_classes)
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
    pred = predict_mitigated(model, targets, thetas, probes, routing=routing)
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
            truth,
            trigger_of,
        ),
        evidence=fitfile.Evidence(
            model.sha256, model.audit, settings.fit.divergence, *map(np.asarray, divergence)
        ),
        source_routed=tuple(t for t in targets if t in source_routed),
        flag_drops=drops,
    )

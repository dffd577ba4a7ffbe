"""The fitting pipeline: from a model and the defender's clean set to a fit file.

Targets known (``targets``) or source:target pairs known (``pairs``): reverse-engineer a trigger
per target on the pooled clean images of its sources (every family, every restart, one batch),
choose the family per target, fit Θ_t for all targets in one batch, and record everything the
later steps need (layers, Θ, triggers, probe inputs with f's and every g_t's logits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__
from .artifact import FitFile
from .data import Dataset
from .errors import BadInputError, FitFileError, ModelError
from .fit import fit_thetas, g_logits, predict_mitigated
from .model import BnaModel
from .reverse import (
    FAMILIES,
    Problem,
    TriggerEstimate,
    choose_family,
    relative_size,
    reverse_engineer,
)
from .settings import Settings

StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: 'reverse', 'fit'."""

PROBES_PER_CLASS = 2
PROBES_PER_TARGET = 4


def model_output_classes(model: BnaModel, x: np.ndarray) -> int:
    """Number of classes K: the width of f's logits on the first images of x."""
    with torch.no_grad():
        out = model(torch.from_numpy(x[:2]))
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
    """What :func:`fit_defence` made: the fit file and the triggers it used per target."""

    fit: FitFile
    triggers: dict[int, list[TriggerEstimate]]


def fit_defence(
    model: BnaModel,
    data: Dataset,
    *,
    targets: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    settings: Settings = Settings(),
    input_range: tuple[float, float] | None = None,
    progress: StageProgress | None = None,
) -> FitOutcome:
    """Reverse-engineer triggers for the given targets or pairs and fit Θ_t for each."""
    torch.manual_seed(settings.seed)
    n_classes = model_output_classes(model, data.x)
    if data.y.max() >= n_classes:
        raise BadInputError(
            f"label {int(data.y.max())} in the data but the model has {n_classes} classes"
        )
    sources = resolve_sources(n_classes, targets, pairs)
    needed = sorted({*sources, *(s for v in sources.values() for s in v)})
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
    families = list(FAMILIES) if settings.trigger_type == "both" else [settings.trigger_type]
    tlist = list(sources)
    problems = [
        Problem(f, t, tuple(sources[t]), r)
        for t in tlist
        for f in families
        for r in range(settings.reverse.restarts)
    ]

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda d, n: progress(name, d, n))

    estimates = reverse_engineer(
        model,
        data,
        problems,
        (lo, hi),
        settings.reverse,
        seed=settings.seed,
        progress=stage("reverse"),
    )
    chosen: dict[int, list[TriggerEstimate]] = {}
    for t in tlist:
        mine = [e for e in estimates if e.problem.target == t]
        best = choose_family(mine, (lo, hi), settings.reverse.success)
        chosen[t] = [e for e in mine if e.family == best.family]
        if settings.family_rule == "successful":
            ok = [e for e in mine if e.success >= settings.reverse.success]
            chosen[t] = ok or chosen[t]
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
        progress=stage("fit"),
    )
    fit = _record(
        model,
        data,
        settings,
        n_classes,
        (lo, hi),
        sources,
        estimates,
        chosen,
        result.thetas,
        result.history,
        mode="targets" if pairs is None else "pairs",
    )
    return FitOutcome(fit, chosen)


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
) -> FitFile:
    targets = list(sources)
    tensors: dict[str, np.ndarray] = {}
    layers = []
    for i, la in enumerate(model.layers):
        layers.append({"index": i, "name": la.name, "channels": la.channels, "eps": la.eps})
        for key in ("running_mean", "running_var", "weight", "bias"):
            tensors[f"layer.{i}.{key}"] = getattr(la, key).numpy().astype(np.float32)
        tensors[f"theta.{i}"] = thetas[i].numpy().astype(np.float32)
    triggers = []
    for j, e in enumerate(estimates):
        used = any(e is u for u in chosen[e.problem.target])
        triggers.append(
            {
                "index": j,
                "family": e.family,
                "target": e.problem.target,
                "sources": list(e.problem.sources),
                "restart": e.problem.restart,
                "size": e.size,
                "relative_size": relative_size(e, input_range),
                "success": e.success,
                "steps": e.steps,
                "used": used,
            }
        )
        tensors[f"trigger.{j}.pattern"] = e.pattern.astype(np.float32)
        if e.mask is not None:
            tensors[f"trigger.{j}.mask"] = e.mask.astype(np.float32)
    probes = _probe_inputs(data, sources, chosen, input_range, n_classes)
    with torch.no_grad():
        f_logits = model(torch.from_numpy(probes)).numpy()
    pred = predict_mitigated(model, targets, thetas, probes)
    tensors["probe.x"] = probes
    tensors["probe.f_logits"] = f_logits.astype(np.float32)
    tensors["probe.g_logits"] = g_logits(model, thetas, len(targets), probes).astype(np.float32)
    tensors["probe.label"] = pred.label.astype(np.int64)
    tensors["probe.triggered"] = pred.triggered.astype(np.bool_)
    tensors["probe.logits"] = pred.logits.astype(np.float32)
    scores = {
        f: [
            {
                "source": None if len(t["sources"]) != 1 else t["sources"][0],
                "target": t["target"],
                "size": t["size"],
                "statistic": 1.0 / max(t["size"], 1e-12),
                "score": None,
            }
            for t in triggers
            if t["family"] == f
        ]
        for f in FAMILIES
    }
    header = {
        "tool": "bna-export",
        "tool_version": __version__,
        "mode": mode,
        "attacked": bool(targets),
        "n_classes": n_classes,
        "input_shape": list(data.x.shape[1:]),
        "input_range": [float(input_range[0]), float(input_range[1])],
        "targets": targets,
        "sources": {str(t): s for t, s in sources.items()},
        "pairs": [[s, t] for t in targets for s in sources[t]],
        "families": {str(t): chosen[t][0].family for t in targets},
        "scores": scores,
        "mad": {
            "consistency": settings.detect.consistency,
            "threshold": settings.detect.mad_threshold,
            "scores_computed": False,
        },
        "triggers": triggers,
        "layers": layers,
        "settings": settings.to_dict(),
        "history": history,
        "data": {
            "images": len(data),
            "sha256": hashlib.sha256(data.x.tobytes() + data.y.tobytes()).hexdigest(),
        },
    }
    return FitFile(header, tensors)


@dataclass
class Mitigation:
    """The parts of a fit file that the mitigated classifier needs."""

    targets: list[int]
    thetas: list[torch.Tensor]
    n_classes: int
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]

    @classmethod
    def from_fit(cls, fit: FitFile) -> Mitigation:
        h, t = fit.header, fit.tensors
        try:
            layers = h["layers"]
            thetas = [torch.from_numpy(np.array(t[f"theta.{i}"])) for i in range(len(layers))]
            out = cls(
                [int(x) for x in h["targets"]],
                thetas,
                int(h["n_classes"]),
                tuple(int(d) for d in h["input_shape"]),
                (float(h["input_range"][0]), float(h["input_range"][1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FitFileError(f"fit file lacks a field or tensor: {exc}") from exc
        for i, (th, la) in enumerate(zip(thetas, layers, strict=True)):
            if th.shape != (len(out.targets), 4, int(la["channels"])):
                raise FitFileError(
                    f"theta.{i} has shape {tuple(th.shape)}; expected "
                    f"({len(out.targets)}, 4, {la['channels']})"
                )
        return out

    def check_model(self, model: BnaModel, fit: FitFile) -> None:
        """Fail unless ``model`` has the BN layers (same statistics) the fit was made on."""
        layers = fit.header["layers"]
        if len(layers) != len(model.layers):
            raise ModelError(
                f"the fit file has {len(layers)} BatchNorm layers, the model "
                f"{len(model.layers)}: this is not the model that was fitted"
            )
        for i, (rec, la) in enumerate(zip(layers, model.layers, strict=True)):
            mean = fit.tensors.get(f"layer.{i}.running_mean")
            if (
                mean is None
                or mean.shape != (la.channels,)
                or not np.allclose(mean, la.running_mean.numpy(), rtol=1e-5, atol=1e-6)
            ):
                raise ModelError(
                    f"BatchNorm layer {i} ({rec['name']}) differs from the fit "
                    "file's: this is not the model that was fitted"
                )

"""What the commands show, ready to print: the text and the ``--json`` objects of ``fit``,
``inspect``, ``evaluate`` and ``build``, signed anomaly-score histograms per trigger family
(text, or a PNG when matplotlib is installed) and the detected pairs with their scores. Reads
fit-file records (:mod:`bna_export.fitfile`), which are validated when read."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .artifact import write_atomic
from .audit import Audit
from .detect import effects, large_side_scores
from .errors import BadInputError
from .fitfile import Detection, FitRecord, PairScore, header_of
from .target_rules import row_minimum_votes

if TYPE_CHECKING:
    from .evaluation import Evaluation
    from .export import Built

OVERFLOW = 20.0
"""Scores beyond ±OVERFLOW share the last bin (an infinite score, MAD = 0, lands there too)."""

Scores = Mapping[str, Sequence[PairScore]]


@dataclass
class Histogram:
    """Counts of signed scores (positive: a smaller trigger than the median) in unit bins."""

    family: str
    edges: list[float]
    counts: list[int]
    detected: list[int]
    threshold: float
    pairs: int


def signed_scores(entries: Sequence[PairScore]) -> np.ndarray:
    """Per pair: +score when the statistic is above the median (small trigger), else -score;
    an infinite score (MAD = 0) is +inf or -inf."""
    stats = np.array([e.statistic for e in entries], dtype=np.float64)
    raw = np.array([np.inf if e.score is None else e.score for e in entries])
    med = np.median(stats) if len(stats) else 0.0
    return np.where(stats > med, raw, -raw)


def score_histograms(scores: Scores, detection: Detection) -> list[Histogram]:
    """One histogram per family of the pair sweep (none when targets or pairs were given)."""
    if not detection.scores_computed:
        return []
    threshold = float(detection.threshold)
    out = []
    for family, entries in sorted(scores.items()):
        if not entries:
            continue
        signed = np.clip(signed_scores(entries), -OVERFLOW, OVERFLOW)
        lo = math.floor(min(signed.min(), 0.0))
        hi = max(math.ceil(signed.max()), math.ceil(min(threshold, OVERFLOW)) + 1, lo + 1)
        edges = np.arange(lo, hi + 1, dtype=np.float64)
        counts, _ = np.histogram(signed, edges)
        flags = np.array([bool(e.detected) for e in entries])
        hits, _ = np.histogram(signed[flags], edges)
        out.append(
            Histogram(
                family, edges.tolist(), counts.tolist(), hits.tolist(), threshold, len(entries)
            )
        )
    return out


def detected_pairs(scores: Scores, detection: Detection) -> list[dict[str, Any]]:
    """The detected pairs, each with its family and its score in every family."""
    families = detection.pair_families
    by_pair: dict[tuple[int | None, int], dict[str, Any]] = {}
    for family, entries in scores.items():
        for e in entries:
            key = (e.source, e.target)
            if key in families:
                row = by_pair.setdefault(
                    key, {"source": e.source, "target": e.target, "family": families[key]}
                )
                row[f"{family}_score"] = e.score
    return sorted(by_pair.values(), key=lambda r: (r["target"], r["source"]))


def _size(value: float | None) -> str:
    return "none (no pooled trigger succeeded)" if value is None else f"{value:.2f}"


def fit_lines(rec: FitRecord, output: str, seconds: float) -> list[str]:
    """What ``fit`` prints: what was checked and found, and each target's triggers."""
    out = []
    det = rec.detection
    if rec.mode == "detect":
        k, sweep = rec.n_classes, det.sweep
        how = (
            f"checked {k * (k - 1)} class pairs"
            if sweep.get("exhaustive", True)
            else f"screened {k} classes ({sweep['problems']} trigger problems)"
        )
        if det.pooled_scores:
            how += f" and {k} targets on every other class's images"
        found = det.detected_pairs
        out.append(f"{how}: " + (f"{len(found)} detected" if found else "no backdoor detected"))
        for t, info in det.intrinsic.items():
            if info.dropped:
                out.append(
                    f"  target {t}: dropped sources {list(info.dropped)} (pooled trigger "
                    f"{_size(info.pooled_size)} vs per-pair up to "
                    f"{max(info.pair_sizes.values()):.2f}: intrinsic, not a backdoor)"
                )
        for t in det.natural_dropped:
            out.append(f"  target {t}: dropped (a natural hub: its triggers look like t inside)")
    if not rec.targets:
        out.append(f"the model is served unchanged; fit file -> {output} ({seconds:.1f}s)")
        return out
    out.append(f"fitted {len(rec.targets)} target(s) in {seconds:.1f}s -> {output}")
    for t in rec.targets:
        used = [tr for tr in rec.triggers if tr.target == t and tr.used]
        sizes = ", ".join(f"{tr.size:.2f}" for tr in used)
        out.append(
            f"  target {t}: sources {list(rec.sources[t])}, {rec.families[t]} "
            f"trigger(s) of size {sizes}, success {used[0].success:.2f}"
        )
    return out


def fit_summary(rec: FitRecord) -> dict[str, Any]:
    """The fit's part of ``fit --json``."""
    h = header_of(rec)
    keys = (
        "mode", "attacked", "targets", "pairs", "sources", "source_routed", "flag_drops",
        "families",
    )  # fmt: skip
    return {
        **{k: h[k] for k in keys},
        **{k: h["detection"][k] for k in ("detected_pairs", "intrinsic", "natural")},
        "natural_dropped": h["detection"]["natural_dropped"],
    }


def summary(rec: FitRecord, path: str) -> dict[str, Any]:
    """``inspect --json``: the header's parts a reader wants, and the detected pairs."""
    h = header_of(rec)
    keys = (
        "tool_version", "mode", "attacked", "targets", "pairs", "sources", "source_routed",
        "flag_drops", "families", "scores", "detection", "triggers", "settings", "layers",
        "n_classes", "input_shape", "input_range",
    )  # fmt: skip
    return {
        "file": path,
        **{k: h[k] for k in keys},
        "evidence": h.get("evidence"),  # None: a fit file from before `report`
        "detected_pairs": detected_pairs(rec.scores, rec.detection),
    }


def evaluation_summary(ev: Evaluation) -> dict[str, Any]:
    """``evaluate --json``: the main column's ACC, ASR, SIA, TPR, FPR, then the rest."""
    return {
        **ev.main,
        "model": ev.results["model"],
        **ev.extra,
        "evaluated": ev.evaluated,
        "targets": ev.targets,
        "clean_images": ev.clean_images,
        "triggered_images": ev.triggered_images,
    }


def evaluation_lines(ev: Evaluation) -> list[str]:
    """``evaluate``'s table: one row per metric, one column per variant."""
    cols = list(ev.results)
    out = [f"{'metric':<8}" + "".join(f"{c:>12}" for c in cols)]
    for key in ("acc", "asr", "sia", "tpr", "fpr"):
        cells = [ev.results[c][key] for c in cols]
        out.append(
            f"{key.upper():<8}" + "".join(f"{'-' if v is None else f'{v:.4f}':>12}" for v in cells)
        )
    return out


def build_summary(built: Built, output: str, triton: str | None, seconds: float) -> dict[str, Any]:
    """``build --json``."""
    return {
        "output": output,
        "triton": triton,
        "bytes": len(built.data),
        "attacked": bool(built.targets),
        "targets": built.targets,
        "layers": built.layers,
        "found_by": built.found_by,
        "self_check": {"probes": built.probes, "max_logit_error": built.max_logit_error},
        "seconds": seconds,
    }


def build_lines(built: Built, output: str, triton: str | None) -> list[str]:
    """What ``build`` prints: where each layer was found, the self-check, what was written."""
    out = []
    if not built.targets:
        out.append("no backdoor in the fit file: the graph is f plus label/triggered/logits")
    else:
        by_name = built.found_by == "name"
        how = "by name (the fit was made from this .onnx)" if by_name else "by value"
        out.append(f"targets {built.targets}; BatchNorm layers found in the graph {how}:")
        out += [f"  {la['name']:<24} -> {la['node']} {la['tensor']!r}" for la in built.layers]
    out.append(
        f"self-check: {built.probes} probes agree with the PyTorch reference "
        f"(logits within {built.max_logit_error:.1e})"
    )
    out.append(f"wrote {output} ({len(built.data) / 1e6:.2f} MB)")
    if triton is not None:
        out.append(f"wrote the Triton model {triton}/ (1/model.onnx, config.pbtxt)")
    return out


def pooled_side_scores(det: Detection, family: str) -> np.ndarray | None:
    """Per target, the pooled rule's score of ``family`` counted only on the side of a smaller
    trigger than the median (None: the fit file keeps no pooled sizes for it)."""
    sc = det.pooled_scores.get(family, ())
    sizes = np.array(det.pooled_sizes.get(family, ()), dtype=np.float64)  # None -> NaN
    if sizes.shape != (len(sc),):
        return None
    with np.errstate(divide="ignore"):
        return large_side_scores(1 / sizes, np.array(sc, dtype=np.float64))


def family_votes(
    scores: Mapping[str, Sequence[PairScore]], family: str, n_classes: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per target (at least ``n_classes`` of them), the vote rule's count in ``family``: how
    many sources' smallest trigger names it, how many sources could, and its effect
    (:func:`bna_export.detect.effects`; None: no pair of an exhaustive sweep recorded)."""
    pairs = [e for e in scores.get(family, ()) if e.source is not None and math.isfinite(e.size)]
    if not pairs or any(e.weight is not None for e in pairs):
        return None
    k = max(n_classes, 1 + max(max(e.source, e.target) for e in pairs if e.source is not None))
    z = np.full((k, k), np.nan)
    for e in pairs:
        z[e.source, e.target] = e.size
    return (*row_minimum_votes(z), effects({family: z})[family])


def inspect_lines(rec: FitRecord, path: str) -> list[str]:
    """What ``inspect`` prints: the verdict, score histograms, detected pairs, the pooled rule's
    best targets, the intrinsic and natural-feature checks, triggers, layers and settings."""
    det = rec.detection
    out = [f"{path}: made by bna-export {rec.tool_version} ({rec.mode} mode)"]
    out.append(f"attacked: {'yes' if rec.attacked else 'no'}; targets: {rec.targets}")
    for t, src, drop in zip(rec.sources, rec.sources.values(), rec.routing.drops, strict=True):
        among = ", answered among them" if t in rec.source_routed else ""
        fell = f"; flagged where t's lead falls by more than {drop:.2f}" if drop > 0 else ""
        out.append(
            f"  target {t} <- sources {list(src)} ({rec.families.get(t)} trigger{among}{fell})"
        )
    for h in score_histograms(rec.scores, det):
        out.append(
            f"anomaly scores, {h.family} family ({h.pairs} pairs; threshold {h.threshold:g}; "
            "+ = smaller trigger than the median; * = detected):"
        )
        top = max(h.counts)
        for lo, n, hit in zip(h.edges[:-1], h.counts, h.detected, strict=True):
            if n == 0 and lo < h.threshold - 1:
                continue
            bar = "#" * (0 if n == 0 else max(1, round(30 * (n - hit) / top))) + "*" * hit
            mark = "  <- threshold" if lo <= h.threshold < lo + 1 else ""
            out.append(f"  [{lo:+4.0f},{lo + 1:+4.0f}) {n:4d} {bar}{mark}")
    found = detected_pairs(rec.scores, det)
    if found:
        out.append("detected pairs:")
        for r in found:
            scores = ", ".join(
                f"{k.removesuffix('_score')} {v:.1f}" if v is not None else f"{k} inf"
                for k, v in sorted(r.items())
                if k.endswith("_score")
            )
            out.append(f"  {r['source']} -> {r['target']} ({r['family']}; scores {scores})")
    for fam in det.pooled_scores:
        side = pooled_side_scores(det, fam)
        if side is None or not side.size:
            continue
        t = int(np.argmax(side))
        out.append(
            f"pooled rule, {fam} family: best target {t} (score {side[t]:.1f}, smaller "
            f"trigger than the median; threshold {det.threshold})"
        )
    for fam in rec.scores if det.scores_computed else ():
        counted = family_votes(rec.scores, fam, rec.n_classes)
        if counted is not None:
            t = int(np.argmax(counted[0]))
            out.append(
                f"vote rule, {fam} family: target {t} is the smallest trigger of "
                f"{counted[0][t]} of {counted[1][t]} sources (effect ×{counted[2][t]:.2f})"
            )
    if det.all_to_all:
        out.append(
            "all-to-all rule: each source's best pair, one source per target: "
            + ", ".join(f"{s} -> {t}" for s, t in det.all_to_all)
        )
    for t, info in det.intrinsic.items():
        largest = max(info.pair_sizes.values(), default=float("nan"))
        out.append(
            f"intrinsic check, target {t}: pooled {info.family} trigger "
            f"{_size(info.pooled_size)} vs per-pair up to {largest:.2f}"
            + (f"; dropped sources {list(info.dropped)}" if info.dropped else "; all kept")
        )
    for t, a in det.natural.items():
        shown = ", ".join(f"{f} {v:.2f}" for f, v in a.items()) or "no trigger succeeded"
        verdict = "dropped: a natural hub" if t in det.natural_dropped else "kept"
        out.append(f"natural-feature check, target {t}: feature alignment {shown}; {verdict}")
    out.append("triggers:")
    out.append(f"  {'target':>6} {'family':<12} {'size':>8} {'rel.':>7} {'success':>8} used")
    for tr in rec.triggers:
        out.append(
            f"  {tr.target:>6} {tr.family:<12} {tr.size:>8.3f} {tr.relative_size:>7.4f} "
            f"{tr.success:>8.3f} {'yes' if tr.used else ''}"
        )
    n_ch = sum(la.channels for la in rec.layers)
    out.append(f"layers: {len(rec.layers)} BatchNorm layers, {n_ch} channels")
    st = rec.settings
    f = st.get("fit", {}) if isinstance(st.get("fit"), dict) else {}
    out.append(
        f"settings: divergence {f.get('divergence')}, epochs {f.get('epochs')}, "
        f"lr {f.get('lr')}, seed {st.get('seed')}, trigger type {st.get('trigger_type')}"
    )
    return out


def pyplot(what: str = "--plot") -> Any:
    """matplotlib's pyplot on the Agg backend; a one-line error naming ``what`` needs it when
    matplotlib is missing. Its log (e.g. the note that it builds its font cache on first use)
    stays off stderr below errors."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BadInputError(f"{what} needs matplotlib: pip install matplotlib") from exc
    return plt


def plot_scores(scores: Scores, detection: Detection, path: str | Path) -> None:
    """Write a PNG of the anomaly-score histograms (one panel per family)."""
    plt = pyplot()
    hists = score_histograms(scores, detection)
    if not hists:
        raise BadInputError("this fit file has no pair sweep to plot (targets or pairs were given)")
    fig, axes = plt.subplots(1, len(hists), figsize=(5 * len(hists), 3.2), squeeze=False)
    draw_scores(list(axes[0]), hists)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig: Any, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG (no timestamp inside), atomically, and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def draw_scores(axes: list[Any], hists: list[Histogram]) -> None:
    """Draw each family's score histogram, detected pairs and threshold on its own axes."""
    for ax, h in zip(axes, hists, strict=True):
        left = np.array(h.edges[:-1])
        clean = np.array(h.counts) - np.array(h.detected)
        ax.bar(left, clean, width=1.0, align="edge", color="#8aa", label="pairs")
        ax.bar(
            left, h.detected, width=1.0, align="edge", bottom=clean, color="#c33", label="detected"
        )
        ax.axvline(h.threshold, color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{h.family} ({h.pairs} pairs)", parse_math=False)  # a name from the file
        ax.set_xlabel("anomaly score (+: smaller trigger than the median)")
        ax.set_ylabel("class pairs")
        ax.legend(fontsize=8)


def audit_lines(audit: Audit, path: str) -> list[str]:
    """``audit``'s answer: the verdict, then a line per finding and per detached output."""
    if audit.clean:
        return [f"{path}: clean: {audit.summary()}"]
    lines = [f"{path}: graph logic found ({len(audit.findings)} nodes)"]
    for f in audit.findings:
        against = f"; tested against {', '.join(f.constants)}" if f.constants else ""
        lines.append(f"  {f.op} {f.node!r}: {f.reason}{against}")
    lines += [f"  output {name!r}: not computed from the image" for name in audit.detached_outputs]
    return lines

"""The report a security team files (``bna-export report``): one self-contained HTML page, its
pictures inline, no script and nothing fetched, with the verdict, the detection, each target's
trigger and examples, the per-layer divergence before and after Θ, the graph audit, the hashes
and, when given, ``evaluate --json``'s metrics. The same fit file gives the same page."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from html import escape
from pathlib import Path
from typing import Any

from .artifact import decode
from .errors import BadInputError, FitFileError
from .fitfile import FitRecord, read
from .report import detected_pairs, family_votes, pooled_side_scores
from .report_figures import divergence_png, scores_png, target_png

METRICS = ("acc", "asr", "sia", "tpr", "fpr")
_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}
h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code{font-size:.9em;word-break:break-all}img{max-width:100%}
.verdict{padding:.8em 1em;border-radius:4px;font-size:1.1em}
.attacked{background:#fde8e8;border:1px solid #c33}.clean{background:#e8f6e8;border:1px solid #393}
.given{background:#eef3fb;border:1px solid #38a}.warn{background:#fff4d6;border:1px solid #c90}
"""


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """``evaluate --json``'s object from ``path``, checked: ACC, ASR, SIA, TPR, FPR (a number
    in [0, 1] or null) of the evaluated classifier, and of f alone under ``model``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"--eval {path}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadInputError(f"--eval {path}: not a JSON file ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise BadInputError(f"--eval {path}: not what `evaluate --json` writes")
    for row in (obj, obj["model"]):
        for key in METRICS:
            v = row.get(key)
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            if key not in row or not ok or (v is not None and not 0 <= v <= 1):
                raise BadInputError(f"--eval {path}: {key} is not a rate in [0, 1] or null")
    return obj


def _png(data: bytes | None, alt: str) -> str:
    if data is None:
        return ""
    return (
        f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
    )


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v)


def verdict(rec: FitRecord) -> tuple[str, str]:
    """(css class, sentence): what the fit concluded."""
    k = rec.n_classes
    if rec.mode == "detect" and not rec.attacked:
        return "clean", (
            f"No backdoor found: no class pair of the {k} classes had an anomalously small "
            "trigger. The model is served unchanged."
        )
    found = "; ".join(
        f"target {t} from {len(s)} source{'s' * (len(s) != 1)} ({rec.families[t]} trigger)"
        for t, s in rec.sources.items()
    )
    if rec.mode == "detect":
        return "attacked", f"Backdoor found and repaired: {found}."
    return "given", f"No detection run ({rec.mode} given); repair fitted for {found}."


def _identity(rec: FitRecord, fit_name: str, fit_sha256: str) -> str:
    ev = rec.evidence
    model = "not recorded (a fit file written before `report`)"
    if ev is not None:
        model = ev.model_sha256 or "none (a Python module without a weights file)"
    rows = [
        ["fit file", fit_name, fit_sha256],
        [f"model ({rec.model_format})", "", model],
        ["defender's images", f"{rec.data_images} images", rec.data_sha256 or "-"],
    ]
    shape = "×".join(str(v) for v in rec.input_shape)
    facts = (
        f"<p>bna-export {escape(rec.tool_version)}; {rec.n_classes} classes; input {shape} in "
        f"[{rec.input_range[0]:g}, {rec.input_range[1]:g}]; {len(rec.layers)} BN layers.</p>"
    )
    body = "".join(
        f"<tr><td>{escape(a)}</td><td>{escape(b)}</td><td><code>{escape(c)}</code></td></tr>"
        for a, b, c in rows
    )
    return f"{facts}<table><tr><th>what</th><th></th><th>SHA-256</th></tr>{body}</table>"


def _audit(rec: FitRecord) -> str:
    ev = rec.evidence
    if ev is None:
        return "<p>Not recorded (a fit file written before `report`).</p>"
    if ev.audit is None:
        return (
            "<p>Not audited: the model was a PyTorch program; `bna-export audit model.onnx` "
            "audits the graph that is deployed.</p>"
        )
    if ev.audit.clean:
        return f'<p class="verdict clean">Clean: {escape(ev.audit.summary())}.</p>'
    rows = [[f.op, f.node, f.reason, ", ".join(f.constants)] for f in ev.audit.findings]
    rows += [
        ["output", name, "not computed from the image", ""] for name in ev.audit.detached_outputs
    ]
    return (
        '<p class="verdict warn">Graph logic found and kept (the fit ran with '
        "--allow-graph-logic): a weight repair does not remove it.</p>"
        + _table(["op", "node", "why", "tested against"], rows)
    )


def _detection(rec: FitRecord, draw: bool) -> str:
    det = rec.detection
    if not det.scores_computed:
        return "<p>No pair sweep: targets or pairs were given to `fit`.</p>"
    sweep = det.sweep
    counts = escape(f"{sweep.get('problems', '?')} problems, {sweep.get('problem_steps', '?')}")
    how = (
        f"<p>Every ordered class pair's smallest trigger was reverse-engineered ({counts} "
        f"solver steps); a pair is detected when its anomaly score exceeds {det.threshold:g} "
        "(MAD units).</p>"
    )
    pairs = detected_pairs(rec.scores, det)
    fams = sorted(rec.scores)
    rows = [
        [p["source"], p["target"], p["family"], *(p.get(f"{f}_score") for f in fams)] for p in pairs
    ]
    table = (
        _table(["source", "target", "family", *(f"{f} score" for f in fams)], rows)
        if rows
        else "<p>No pair detected.</p>"
    )
    plot = _png(scores_png(rec), "anomaly-score histograms") if draw else ""
    return how + plot + table + _whole(rec) + _all_to_all(rec) + _checks(rec)


def _checks(rec: FitRecord) -> str:
    """The two checks that can take a finding back: the intrinsic-backdoor check (sources
    that are no one backdoor) and the natural-feature check (a clean model's natural hub)."""
    det = rec.detection
    rows: list[list[Any]] = []
    for t, info in sorted(det.intrinsic.items()):
        largest = max(info.pair_sizes.values(), default=None)
        pooled = "not solved" if info.pooled_size is None else f"{info.pooled_size:.3g}"
        biggest = "-" if largest is None else f"{largest:.3g}"
        rows.append([
            "intrinsic", t, f"pooled {info.family} trigger {pooled} vs per-pair up to {biggest}",
            f"dropped sources {', '.join(map(str, info.dropped))}" if info.dropped else "kept",
        ])  # fmt: skip
    for t, a in sorted(det.natural.items()):
        shown = ", ".join(f"{f} {v:.2f}" for f, v in a.items()) or "no trigger succeeded"
        rows.append([
            "natural feature", t, f"feature alignment {shown}",
            "dropped: a natural hub" if t in det.natural_dropped else "kept",
        ])  # fmt: skip
    if not rows:
        return ""
    return (
        "<p>Checks of the targets found: the <em>intrinsic</em> check drops sources whose "
        "pooled trigger is far larger than their own pairs' (no one trigger moves them: "
        "<code>detect.intrinsic_ratio</code>); the <em>natural-feature</em> check drops a "
        "target whose every trigger estimate moves the model's features toward the target's "
        "own (its alignment reaches <code>detect.natural_alignment</code>: a class that is "
        "easy to reach on a clean model, not a backdoor).</p>"
        + _table(["check", "target", "measure", "result"], rows)
    )


def _all_to_all(rec: FitRecord) -> str:
    found = rec.detection.all_to_all
    if not found:
        return ""
    listed = ", ".join(f"{s} → {t}" for s, t in found)
    return (
        f"<p>All-to-all rule: {len(found)} of the {rec.n_classes} sources each have their own "
        "target whose trigger is their smallest (a mapping, one source per target), each pair "
        "scoring at least <code>detect.all_to_all_bar</code> × the threshold: "
        f"{escape(listed)}.</p>"
    )


HEAD_WHOLE = [
    "target",
    "family",
    "column score (median pair)",
    "pooled score",
    "sources whose smallest trigger goes to it, effect",
]


def _whole(rec: FitRecord) -> str:
    """The targets the all-to-one rules found as a whole, with their column and pooled scores
    and votes (a pair of such a target is detected below the threshold)."""
    det = rec.detection
    if not det.all_to_one:
        return ""
    rows = []
    for t, fam in sorted(det.all_to_one.items()):
        column = det.target_scores.get(fam, ())
        pooled = pooled_side_scores(det, fam)
        counted = family_votes(rec.scores, fam, rec.n_classes)
        votes = (
            None if counted is None else f"{counted[0][t]} of {counted[1][t]}, ×{counted[2][t]:.2f}"
        )
        pooled_t = None if pooled is None or t >= len(pooled) else float(pooled[t])
        rows.append([t, fam, column[t] if t < len(column) else None, pooled_t, votes])
    return (
        "<p>Targets detected as a whole (all-to-one): every source of such a target counts as "
        "detected, since its triggers from all other classes are small together even where "
        "one pair alone stays under the threshold.</p>" + _table(HEAD_WHOLE, rows)
    )


def _targets(rec: FitRecord, draw: bool) -> str:
    parts = []
    for t, srcs in rec.sources.items():
        used = [tr for tr in rec.triggers if tr.target == t and tr.used]
        rows = [
            [tr.family, ", ".join(map(str, tr.sources)), tr.size, tr.relative_size, tr.success]
            for tr in used
        ]
        pic = target_png(rec, t) if draw else None
        parts.append(
            f"<h3>Target {t}</h3><p>Sources: {escape(', '.join(map(str, srcs)))}. "
            f"Θ was fitted on {len(used)} trigger{'s' * (len(used) != 1)}.</p>"
            + _table(["family", "sources", "size", "relative size", "success"], rows)
            + (_png(pic, f"target {t}: trigger and examples") if pic else
               "" if not draw else _no_examples(used))
        )  # fmt: skip
    return "".join(parts) or "<p>No target: nothing to repair.</p>"


def _no_examples(used: list[Any]) -> str:
    if not used:
        return "<p>No trigger of this target was used: nothing to show.</p>"
    return "<p>Examples not recorded (a fit file written before `report`).</p>"


def _divergence(rec: FitRecord, draw: bool) -> str:
    ev = rec.evidence
    if ev is None or not rec.targets:
        return "<p>Nothing fitted, or not recorded.</p>"
    rows = [
        [t, i, rec.layers[i].name, *(float(v[r, i]) for v in (ev.floor, ev.before, ev.after))]
        for r, t in enumerate(rec.targets)
        for i in range(len(rec.layers))
    ]
    text = (
        f"<p>Per BN layer, the mean over channels of {escape(ev.divergence.upper())}(p ‖ q): "
        "p the clean "
        "source images' activation histogram, q the same images with the trigger, through the "
        "model as delivered (before) and through the repaired g_t (after); the floor is what "
        "the same images without a trigger give through f, the sampling noise of these "
        "histograms. Θ minimises the sum over layers together with its cross-entropy terms "
        "(the repaired answer must stay right), so a layer may move away from p where a deeper "
        "one moves back.</p>"
    )
    return (
        text
        + (_png(divergence_png(rec), "per-layer divergence") if draw else "")
        + _table(["target", "layer", "name", "floor (no trigger)", "before", "after"], rows)
    )


def _evaluation(ev: dict[str, Any] | None) -> str:
    if ev is None:
        return ""
    label = "repaired" if ev.get("evaluated") == "mitigated" else "evaluated"
    rows = [["model as delivered (f)", *(_rate(ev["model"][k]) for k in METRICS)]]
    if ev.get("evaluated") == "mitigated":
        rows.append([label, *(_rate(ev[k]) for k in METRICS)])
    n = f"{ev.get('clean_images', '?')} clean, {ev.get('triggered_images', '?')} triggered images"
    return f"<h2>Evaluation</h2><p>From `evaluate --json` ({escape(n)}).</p>" + _table(
        ["", *(k.upper() for k in METRICS)], rows
    )


def render(
    rec: FitRecord,
    fit_name: str,
    fit_sha256: str,
    evaluation: dict[str, Any] | None = None,
    draw: bool = True,
) -> str:
    """The report page of a fit-file record (``fit_name`` and ``fit_sha256``: the file's;
    ``draw=False``: the tables without the pictures, and without matplotlib)."""
    css, sentence = verdict(rec)
    settings = escape(json.dumps(rec.settings, indent=1, sort_keys=True))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>bna-export report: {escape(fit_name)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>bna-export report: {escape(fit_name)}</h1>"
        f'<p class="verdict {css}">{escape(sentence)}</p>'
        f"<h2>Identity</h2>{_identity(rec, fit_name, fit_sha256)}"
        f"<h2>Graph audit</h2>{_audit(rec)}"
        f"<h2>Detection</h2>{_detection(rec, draw)}"
        f"<h2>Targets and their triggers</h2>{_targets(rec, draw)}"
        f"<h2>Per-layer divergence, before and after Θ</h2>{_divergence(rec, draw)}"
        f"{_evaluation(evaluation)}"
        f"<h2>Settings</h2><details><summary>the fit's settings</summary><pre>{settings}</pre>"
        "</details></body></html>\n"
    )


def report_file(fit_path: str | Path, eval_path: str | Path | None = None) -> str:
    """The report page of the fit file at ``fit_path`` (and ``evaluate --json``'s output)."""
    try:
        data = Path(fit_path).read_bytes()
    except FileNotFoundError:
        raise FitFileError(f"{fit_path}: no such file") from None
    except OSError as exc:
        raise FitFileError(f"{fit_path}: cannot read ({exc.strerror})") from None
    rec = read(decode(data, str(fit_path)))
    evaluation = None if eval_path is None else read_evaluation(eval_path)
    return render(rec, Path(fit_path).name, hashlib.sha256(data).hexdigest(), evaluation)

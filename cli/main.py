"""The ``bna-export`` command line: parse, call the library, print. Errors from the library
(:class:`bna_export.BnaError`) become one line on stderr and exit code 2."""

from __future__ import annotations

import time
from pathlib import Path

import click

from bna_export import __version__, artifact, distributed, fitfile, report
from bna_export.data import load_data, load_inputs
from bna_export.defend import fit_defence
from bna_export.errors import BadInputError
from bna_export.evaluation import evaluate as evaluate_model
from bna_export.export import build_graph
from bna_export.model import load_model_for
from bna_export.onnxfile import load_built
from bna_export.runtime import check_inputs, open_built, ran_on, run_built
from bna_export.settings import DetectSettings, FitSettings, ReverseSettings, for_fit
from bna_export.triton import write_triton_repo

from .options import (
    BnaGroup,
    Progress,
    allow_logic_option,
    batch_size_option,
    common,
    echo_lines,
    emit,
    int_list,
    output_option,
    pair_list,
    path_option,
    provider_option,
    warn_graph_logic,
    weights_option,
)
from .options import input_range as parse_range
from .security import audit, report_cmd, verify


@click.group(cls=BnaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bna-export")
def cli() -> None:
    """Find a backdoor in an image classifier, repair it without changing a trained weight
    (BNA), and check the repair.

    \b
    Typical use:
      bna-export fit --model net.pt2 --data clean.npz -o net.bna
      bna-export inspect net.bna
      bna-export evaluate net.pt2 --fit net.bna --clean test.npz --triggered trig.npz
    """


@cli.command()
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="A .pt2 file (torch.export.save), package.module:callable, or the deployed .onnx "
    "(then h goes on its BatchNormalization, Conv and Gemm outputs, and `build` on the same "
    ".onnx finds the layers by name).",
)
@weights_option
@path_option(
    "--data",
    "data_path",
    "Clean labelled images: .npz with x (N×C×H×W) and y, or a folder per class.",
)
@output_option("Fit file to write (.bna).")
@click.option(
    "--targets",
    help="Skip detection: repair these target classes, e.g. 3,5 (sources: all others).",
)
@click.option("--pairs", help="Skip detection: repair these source:target pairs, e.g. 0:1,4:5.")
@click.option(
    "--trigger-type",
    type=click.Choice(["patch", "perturbation", "blend", "warp", "both"]),
    default="both",
    show_default=True,
    help="Trigger family to reverse-engineer, or both: every family of the settings "
    "`families` (per target) and `detect_families` (sweep), as the defender does not know.",
)
@click.option(
    "--divergence",
    type=click.Choice(["tv", "js", "kl"]),
    default="tv",
    show_default=True,
    help="Divergence between clean and corrected histograms.",
)
@click.option(
    "--mad-threshold",
    type=click.FloatRange(0, min_open=True),
    default=DetectSettings.mad_threshold,
    show_default=True,
    help="Anomaly-score threshold of detection (3 suits warping triggers).",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=FitSettings.epochs,
    show_default=True,
    help="Epochs of Θ fitting.",
)
@click.option(
    "--restarts",
    type=click.IntRange(1),
    default=ReverseSettings.restarts,
    show_default=True,
    help="Independent trigger estimates per target and family for fitting.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Any other setting of bna_export/settings.py, e.g. --set reverse.steps=500 "
    "--set detect.normalise=none (repeatable).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to compute: auto takes the GPU when PyTorch sees one; under torchrun each "
    "rank takes the GPU of its LOCAL_RANK (one rank per GPU).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of every random choice; the same inputs and seed give the same fit file.",
)
@click.option(
    "--input-range", help="LO,HI of the model's input (default: 0,1 widened to the data's range)."
)
@allow_logic_option
@common
def fit(
    model_spec: str,
    weights: str | None,
    data_path: str,
    output: str,
    targets: str | None,
    pairs: str | None,
    trigger_type: str,
    divergence: str,
    mad_threshold: float,
    epochs: int,
    restarts: int,
    overrides: tuple[str, ...],
    device: str,
    seed: int,
    input_range: str | None,
    allow_graph_logic: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Find out whether the model is backdoored and fit the BNA correction Θ_t for each
    attacked target class.

    \b
    Without --targets or --pairs, a trigger is reverse-engineered for every ordered class
    pair (K·(K-1) problems, both trigger families, one batch) and the pairs whose trigger is
    anomalously small are detected (MAD score above --mad-threshold). Nothing detected: the
    fit file says so and the model is served unchanged.

    \b
    The pair sweep runs sharded over processes with torchrun, each rank a slice of the pairs
    (same result as one process):
      torchrun --nproc-per-node 2 -m bna_export.cli.main fit --model m.pt2 --data d.npz -o m.bna
    """
    tlist, plist = int_list(targets, "--targets"), pair_list(pairs)
    if tlist is not None and plist is not None:
        raise BadInputError("give at most one of --targets and --pairs")
    artifact.check_folder(output)
    settings = for_fit(
        trigger_type=trigger_type,
        seed=seed,
        divergence=divergence,
        epochs=epochs,
        restarts=restarts,
        mad_threshold=mad_threshold,
        overrides=overrides,
    )
    where = distributed.resolve_device(device)
    data = load_data(data_path)
    model = load_model_for(model_spec, weights, data, where, allow_graph_logic)
    warn_graph_logic(model.audit, model_spec)
    shard = distributed.start(where)
    progress = Progress(quiet or not shard.primary)
    start = time.perf_counter()
    try:
        outcome = fit_defence(
            model,
            data,
            targets=tlist,
            pairs=plist,
            settings=settings,
            input_range=parse_range(input_range),
            progress=progress,
            shard=shard,
        )
    finally:
        progress.close()
        distributed.stop(shard)
    if outcome is None:  # another rank writes the results
        return
    digest = artifact.save(output, outcome.fit)
    seconds = time.perf_counter() - start
    if as_json:
        summary = report.fit_summary(outcome.record)
        emit({"output": output, "sha256": digest, "seconds": round(seconds, 2), **summary,
              "ranks": shard.world, "device": str(where)})  # fmt: skip
        return
    echo_lines(report.fit_lines(outcome.record, output, seconds))


@cli.command()
@click.argument("fit_path", metavar="FIT.bna", type=click.Path())
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Also write a PNG of the anomaly-score histograms (needs matplotlib).",
)
@common
def inspect(fit_path: str, plot_path: str | None, as_json: bool, quiet: bool) -> None:
    """Show what a fit file holds: whether an attack was detected, the anomaly scores of the
    class pairs, targets, sources, triggers, layers and settings."""
    rec = fitfile.load(fit_path)
    if plot_path is not None:
        artifact.check_folder(plot_path)
        report.plot_scores(rec.scores, rec.detection, plot_path)
    if as_json:
        emit(report.summary(rec, fit_path))
        return
    echo_lines(report.inspect_lines(rec, fit_path))
    if plot_path is not None:
        click.echo(f"plot -> {plot_path}")


@cli.command()
@click.argument("model_spec", metavar="MODEL")
@weights_option
@path_option("--clean", "clean_path", "Clean test images (.npz with x, y, or a folder per class).")
@path_option(
    "--triggered",
    "trig_path",
    ".npz with triggered x, true source y, and attack_label.",
    required=False,
)
@path_option(
    "--fit",
    "fit_path",
    "Fit file: evaluate the mitigated classifier (PyTorch reference) instead of the model alone.",
    required=False,
)
@batch_size_option
@provider_option
@allow_logic_option
@common
def evaluate(
    model_spec: str,
    weights: str | None,
    clean_path: str,
    trig_path: str | None,
    fit_path: str | None,
    batch_size: int,
    provider: str,
    allow_graph_logic: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """ACC, ASR, SIA, TPR, FPR of a model, or of its BNA-mitigated version with --fit.

    MODEL may also be a graph made by `build` (OUT.onnx, run in ONNX Runtime with --provider):
    the 'model' column is then f inside it, the other column the routed graph. A plain
    model.onnx (f as exported) runs as the PyTorch reference, like a .pt2.

    FPR is the share of clean images of the attack's target classes (the attack labels of
    --triggered; without it the fit's targets) that get flagged.
    """
    ev = evaluate_model(
        model_spec, weights, clean_path, trig_path, fit_path, provider, batch_size,
        allow_graph_logic,
    )  # fmt: skip
    if as_json:
        emit(report.evaluation_summary(ev))
        return
    echo_lines(report.evaluation_lines(ev))


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path())
@path_option("--fit", "fit_path", "The fit file (from `fit`).")
@output_option(
    "Where to write the built graph (one .onnx, weights inline).", "out_path", file=False
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False),
    help="Also write a Triton model repository here: <name>/1/model.onnx and config.pbtxt.",
)
@click.option(
    "--triton-name", help="Model name in the Triton repository (default: OUT.onnx's stem)."
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Triton's max_batch_size (dynamic batching).",
)
@allow_logic_option
@common
def build(
    onnx_path: str,
    fit_path: str,
    out_path: str,
    triton_repo: str | None,
    triton_name: str | None,
    max_batch_size: int,
    allow_graph_logic: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Rewrite MODEL.onnx (the f you deploy) into one graph with f, every g_t and the routing.

    The BN layers of the fit are found in the graph by value (folded into Conv/Gemm or kept as
    BatchNormalization). The result is run in ONNX Runtime on the fit file's probe inputs and
    written only when it agrees with the PyTorch reference (exit 2 and nothing written if not).
    Outputs: label int64 [N], triggered bool [N], logits float [N, K]. A graph that selects
    or branches on the image's values is refused (see `audit`).
    """
    fit = artifact.load(fit_path)
    artifact.check_folder(out_path)
    t0 = time.perf_counter()
    built = build_graph(onnx_path, fit, allow_graph_logic=allow_graph_logic)
    warn_graph_logic(built.audit, onnx_path)
    artifact.write_atomic(out_path, built.data)
    triton = None
    if triton_repo is not None:
        name = triton_name or Path(out_path).stem
        triton = str(write_triton_repo(triton_repo, name, built.data, max_batch_size))
    if as_json:
        emit(report.build_summary(built, out_path, triton, time.perf_counter() - t0))
        return
    echo_lines(report.build_lines(built, out_path, triton))


@cli.command()
@click.argument("onnx_path", metavar="OUT.onnx", type=click.Path())
@path_option("--data", "data_path", "Images: .npz with x, a .npy array, or a folder.")
@provider_option
@batch_size_option
@output_option("Write label, triggered, logits (.npz).", "out_path", required=False, file=False)
@common
def run(
    onnx_path: str,
    data_path: str,
    provider: str,
    batch_size: int,
    out_path: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Batch inference of a built graph with ONNX Runtime; says which provider ran."""
    x = load_inputs(data_path)
    if out_path is not None:
        artifact.check_folder(out_path)
    sess, _ = open_built(load_built(onnx_path), provider)
    check_inputs(sess, x, data_path)
    bar = Progress(quiet)
    t0 = time.perf_counter()
    out = run_built(sess, x, batch_size, lambda d, n: bar("run", d, n))
    seconds = time.perf_counter() - t0
    bar.close()
    if out_path is not None:
        artifact.write_atomic(out_path, out.to_npz())
    info = {
        "provider": ran_on(sess),
        "images": len(x),
        "triggered": int(out.triggered.sum()),
        "seconds": seconds,
        "output": out_path,
    }
    if as_json:
        emit({**info, "label": out.label.tolist(), "flags": out.triggered.astype(int).tolist()})
        return
    click.echo(
        f"provider {info['provider']}: {len(x)} images, {info['triggered']} flagged as "
        f"triggered, {seconds:.2f} s"
    )
    if out_path is not None:
        click.echo(f"wrote {out_path}")


cli.add_command(audit)
cli.add_command(report_cmd)
cli.add_command(verify)


def main() -> None:
    cli(prog_name="bna-export")


if __name__ == "__main__":  # pragma: no cover
    main()

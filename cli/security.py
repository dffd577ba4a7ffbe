"""The commands a deploy pipeline and a security team run: ``audit`` (graph logic a weight
repair cannot remove), ``verify`` (a built graph is what its model and fit file build) and
``report`` (one HTML page to file)."""

from __future__ import annotations

import hashlib

import click

from bna_export import report
from bna_export.artifact import check_folder, write_atomic
from bna_export.audit import audit_file
from bna_export.export import verify_built
from bna_export.html_report import report_file

from .options import allow_logic_option, common, echo_lines, emit, output_option, path_option


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path())
@common
def audit(onnx_path: str, as_json: bool, quiet: bool) -> None:
    """List what in MODEL.onnx's graph selects or branches on the image's values: If, Loop,
    Where, comparisons, ArgMax/TopK feeding anything but an output, NonZero, indexing with
    computed indices, the constants compared against, and outputs not computed from the
    image. A backdoor written into the graph hides there; no weight repair removes it.

    Exit 0 when nothing is found, 1 when something is, 2 when MODEL.onnx cannot be read.
    """
    found = audit_file(onnx_path)
    if as_json:
        emit({"model": onnx_path, **found.to_json()})
    else:
        echo_lines(report.audit_lines(found, onnx_path))
    if not found.clean:
        click.get_current_context().exit(1)


@click.command()
@click.argument("built_path", metavar="REPAIRED.onnx", type=click.Path())
@path_option("--model", "model_path", "The .onnx that was given to `build`.")
@path_option("--fit", "fit_path", "The fit file that was given to `build`.")
@allow_logic_option
@common
def verify(
    built_path: str,
    model_path: str,
    fit_path: str,
    allow_graph_logic: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Rebuild REPAIRED.onnx from --model and --fit and check that it is the same bytes (a
    build is deterministic): what a deploy pipeline runs before it ships the repaired graph.

    Exit 0 when identical; 1 when not, or when it cannot be rebuilt from these inputs (the line
    says why: another model or fit file, by their SHA-256 in the graph's metadata, or other
    bytes); 2 when REPAIRED.onnx cannot be read.
    """
    got = verify_built(built_path, model_path, fit_path, allow_graph_logic)
    if as_json:
        emit({"built": built_path, "identical": got.identical, "reason": got.reason,
              "built_sha256": got.built_sha256, "rebuilt_sha256": got.rebuilt_sha256})  # fmt: skip
    else:
        verdict = "verified" if got.identical else "NOT verified"
        click.echo(f"{verdict}: {built_path}: {got.reason}")
    if not got.identical:
        click.get_current_context().exit(1)


@click.command(name="report")
@click.argument("fit_path", metavar="FIT.bna", type=click.Path())
@path_option("--eval", "eval_path", "`evaluate --json`'s output: adds its metrics.", False)
@output_option("The HTML file to write (report.html).")
@common
def report_cmd(
    fit_path: str, eval_path: str | None, output: str, as_json: bool, quiet: bool
) -> None:
    """Write one self-contained HTML page to file with a fit: the verdict, the anomaly-score
    histograms with the threshold, every detected pair, each target's reverse-engineered
    trigger beside clean and triggered examples, how far the trigger moves each BN layer
    before and after the repair, the graph audit, the SHA-256 of the fit file, the model and
    the defender's images, and with --eval the ACC/ASR/SIA/TPR/FPR table. Pictures are inline;
    the page runs no script and fetches nothing (needs matplotlib).
    """
    check_folder(output)
    page = report_file(fit_path, eval_path).encode()
    write_atomic(output, page)
    if as_json:
        emit({"output": output, "sha256": hashlib.sha256(page).hexdigest(), "bytes": len(page)})
    else:
        click.echo(f"report -> {output} ({len(page) // 1024} KiB)")

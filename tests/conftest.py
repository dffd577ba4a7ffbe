"""Shared fixtures: tiny seeded models and data, trained in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bna_export.cli.main import cli
from click.testing import CliRunner
from tiny_models import export_onnx

from bna_export.lab.scenario import (
    Scenario,
    build_scenario,
    synthetic_scenario_data,
    write_scenario,
)
from bna_export.model import adapt_module
from bna_export.reverse import Problem, reverse_engineer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def patch_scenario() -> Scenario:
    """A 5-class 16×16 CNN with BN, poisoned all-to-one (target 0) with a 3×3 patch."""
    x, y = synthetic_scenario_data()
    return build_scenario(
        x, y, attack="patch", target=0, width=8, epochs=6, seed=0, defender_per_class=20
    )


@pytest.fixture(scope="session")
def patch_files(
    patch_scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return write_scenario(patch_scenario, tmp_path_factory.mktemp("patch"))


@pytest.fixture(scope="session")
def patch_estimate(patch_scenario):
    """f of the patch scenario as a BnaModel and a patch trigger estimated for target 0 from
    sources 1-4 (shared by the Θ-fit and layer-divergence tests)."""
    model = adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))
    ests = reverse_engineer(
        model, patch_scenario.defender, [Problem("patch", 0, (1, 2, 3, 4))], (0.0, 1.0)
    )
    return model, ests


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def equidistant_scenario(setting: str, attack: str | None = "patch") -> Scenario:
    """An 8-class 16×16 CNN on equidistant synthetic classes (no pair of classes is naturally
    closer than another), poisoned with a 3×3 patch all-to-one (target 0) or all-to-all
    (c -> c + 1; more poison and epochs, or the attack does not take), or clean."""
    x, y = synthetic_scenario_data(n_classes=8, equidistant=True)
    a2a = setting == "a2a"
    return build_scenario(
        x,
        y,
        attack=attack,
        setting=setting,
        target=0,
        width=8,
        epochs=10 if a2a else 6,
        poison_rate=0.2 if a2a else 0.1,
        seed=0,
    )


@pytest.fixture(scope="session")
def a2o_scenario() -> Scenario:
    return equidistant_scenario("a2o")


@pytest.fixture(scope="session")
def a2a_scenario() -> Scenario:
    return equidistant_scenario("a2a")


@pytest.fixture(scope="session")
def clean_scenario() -> Scenario:
    return equidistant_scenario("a2o", attack=None)


@pytest.fixture(scope="session")
def a2o_files(a2o_scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_scenario(a2o_scenario, tmp_path_factory.mktemp("a2o"))


@pytest.fixture(scope="session")
def clean_files(
    clean_scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return write_scenario(clean_scenario, tmp_path_factory.mktemp("clean"))


def cli_fit(files: dict[str, Path], out: Path, *extra: str):
    """`fit` through the CLI on a scenario's files; returns click's result."""
    args = ["fit", "--model", files["model"], "--data", files["defender"], "-o", out, "-q"]
    return CliRunner().invoke(cli, [str(a) for a in (*args, *extra)])


@pytest.fixture(scope="session")
def a2o_detected_file(a2o_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`fit` with no hint through the CLI on the all-to-one scenario: (fit file, its --json
    report); the library's detection tests read the same file."""
    out = tmp_path_factory.mktemp("detect") / "fit.bna"
    res = cli_fit(a2o_files, out, "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


@pytest.fixture(scope="session")
def clean_detected_file(clean_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`fit` with no hint through the CLI on the clean scenario: (fit file, what it printed)."""
    out = tmp_path_factory.mktemp("clean-fit") / "clean.bna"
    res = cli_fit(clean_files, out)
    assert res.exit_code == 0, res.output
    return out, res.stdout


@pytest.fixture(scope="session")
def fitted(patch_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`fit --targets 0` through the CLI on the patch scenario: (fit file, its JSON report)."""
    out = tmp_path_factory.mktemp("fit") / "fit.bna"
    res = CliRunner().invoke(
        cli,
        [
            str(a)
            for a in (
                "fit",
                "--model",
                patch_files["model"],
                "--data",
                patch_files["defender"],
                "--targets",
                "0",
                "-o",
                out,
                "--json",
                "--quiet",
            )
        ],
    )
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


@pytest.fixture(scope="session")
def built_files(patch_scenario: Scenario, fitted, tmp_path_factory: pytest.TempPathFactory):
    """f of the patch scenario as ONNX and `build` of its `fit --targets 0` through the CLI:
    (model.onnx, the built graph, what build printed)."""
    folder = tmp_path_factory.mktemp("built")
    example = torch.from_numpy(patch_scenario.test.x[:2])
    onnx_path = export_onnx(patch_scenario.net, example, folder / "f.onnx", "dynamo")
    out = folder / "out.onnx"
    res = CliRunner().invoke(
        cli, ["build", str(onnx_path), "--fit", str(fitted[0]), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    return onnx_path, out, res.stdout

"""Shared fixtures: tiny seeded models and data, trained in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bna_export.scenario import Scenario, build_scenario, synthetic_scenario_data, write_scenario

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


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

import numpy as np
import pytest
import torch

from bna_export.model import adapt_module
from bna_export.reverse import (
    Problem,
    TriggerEstimate,
    attack_success,
    choose_family,
    relative_size,
    reverse_engineer,
)
from bna_export.settings import ReverseSettings


@pytest.fixture(scope="module")
def model(patch_scenario):
    return adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))


def test_backdoor_target_needs_a_far_smaller_patch(model, patch_scenario):
    """The poisoned target (0) is reached with a small mask; a clean target (2) needs more."""
    problems = [
        Problem("patch", 0, (1, 2, 3, 4)),
        Problem("patch", 2, (0, 1, 3, 4)),
        Problem("perturbation", 0, (1, 2, 3, 4)),
    ]
    ests = reverse_engineer(model, patch_scenario.defender, problems, (0.0, 1.0), seed=0)
    assert [e.problem for e in ests] == problems
    backdoor, clean, pert = ests
    assert backdoor.success >= 0.9
    assert backdoor.size < 0.75 * clean.size, (backdoor.size, clean.size)
    assert backdoor.mask.shape == (16, 16) and backdoor.pattern.shape == (1, 16, 16)
    assert pert.mask is None and pert.size == pytest.approx(np.linalg.norm(pert.pattern), 1e-4)
    # the recorded success is what embedding the trigger really does
    x = torch.from_numpy(patch_scenario.defender.x[patch_scenario.defender.y != 0])
    assert attack_success(model, x, backdoor, 0, (0.0, 1.0)) == pytest.approx(backdoor.success)


def test_batched_equals_alone_and_is_seeded(model, patch_scenario):
    """A problem's answer does not depend on the batch it is solved in (same seed)."""
    settings = ReverseSettings(steps=60, min_steps=20)
    p = Problem("patch", 0, (1, 2, 3, 4))
    a = reverse_engineer(model, patch_scenario.defender, [p], (0.0, 1.0), settings, seed=3)
    b = reverse_engineer(model, patch_scenario.defender, [p], (0.0, 1.0), settings, seed=3)
    np.testing.assert_array_equal(a[0].mask, b[0].mask)
    assert a[0].size == b[0].size


def test_early_stop_ends_problems_before_the_step_limit(model, patch_scenario):
    settings = ReverseSettings(steps=2000, min_steps=50, patience=3)
    ests = reverse_engineer(
        model, patch_scenario.defender, [Problem("patch", 0, (1, 2, 3, 4))], (0.0, 1.0), settings
    )
    assert ests[0].steps < 2000 and ests[0].success >= 0.9


def est(family: str, size: float, success: float) -> TriggerEstimate:
    pat = np.zeros((1, 10, 10), dtype=np.float32)
    mask = np.zeros((10, 10), dtype=np.float32) if family == "patch" else None
    return TriggerEstimate(Problem(family, 0, (1,)), size, success, 1, mask, pat)


def test_family_rule():
    patch, pert = est("patch", 5.0, 0.99), est("perturbation", 1.0, 0.99)
    assert relative_size(patch, (0, 1)) == pytest.approx(0.05)
    assert relative_size(pert, (0, 1)) == pytest.approx(0.1)
    assert choose_family([patch, pert], (0, 1), 0.95) is patch
    assert choose_family([est("patch", 5.0, 0.5), pert], (0, 1), 0.95) is pert
    assert (
        choose_family([est("patch", 5.0, 0.5), est("perturbation", 1, 0.6)], (0, 1), 0.95).family
        == "perturbation"
    )


def test_draw_takes_each_problem_from_its_own_pool():
    from bna_export.reverse import _draw

    pool_mat = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]])
    pool_len = torch.tensor([5, 2])
    got = _draw(pool_mat, pool_len, 4, torch.Generator().manual_seed(0))
    assert got.shape == (2, 4)
    assert set(got[0].tolist()) <= {5, 6, 7, 8, 9} and len(set(got[0].tolist())) == 4
    assert set(got[1].tolist()) == {1, 2}  # a pool smaller than the batch is cycled

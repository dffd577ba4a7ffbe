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


def test_a_problem_gets_the_same_answer_alone_or_in_any_batch(model, patch_scenario):
    """Per-problem seeds and batch-independent forwards: the estimate of a problem does not
    depend on which other problems share its batch (what makes sharding exact)."""
    settings = ReverseSettings(steps=60, min_steps=20, batch_size=16, images_per_forward=64)
    p = Problem("patch", 0, (1, 2, 3, 4))
    q = Problem("perturbation", 0, (1,))
    others = [Problem("patch", 2, (0, 1)), Problem("perturbation", 3, (4,), restart=1)]
    data = patch_scenario.defender
    alone = [reverse_engineer(model, data, [x], (0.0, 1.0), settings, seed=3)[0] for x in (p, q)]
    mixed = reverse_engineer(model, data, [others[0], q, p, others[1]], (0.0, 1.0), settings, 3)
    for a, b in zip(alone, [mixed[2], mixed[1]], strict=True):
        assert a.size == b.size and a.steps == b.steps and a.success == b.success
        np.testing.assert_array_equal(a.pattern, b.pattern)
    # another seed or restart gives another estimate
    other = reverse_engineer(model, data, [p], (0.0, 1.0), settings, seed=4)[0]
    assert not np.array_equal(other.mask, alone[0].mask)


def test_early_stop_ends_problems_before_the_step_limit(model, patch_scenario):
    settings = ReverseSettings(steps=2000, min_steps=50, patience=3)
    ests = reverse_engineer(
        model, patch_scenario.defender, [Problem("patch", 0, (1, 2, 3, 4))], (0.0, 1.0), settings
    )
    assert ests[0].steps < 2000 and ests[0].success >= 0.9


def est(family: str, size: float, success: float) -> TriggerEstimate:
    params = {"pattern": np.zeros((1, 10, 10), dtype=np.float32)}
    if family == "patch":
        params["mask"] = np.zeros((1, 10, 10), dtype=np.float32)
    return TriggerEstimate(Problem(family, 0, (1,)), size, success, 1, params, (1, 10, 10))


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


def test_problems_of_much_larger_pools_are_solved_apart(model, patch_scenario):
    """A batch pads every problem to its largest pool: one-class pairs are not solved beside
    a pooled problem of every other class (which would cost them its batch and full-pool
    checks), and the estimates and their order are those of solving each alone."""
    from bna_export.reverse import _groups

    data = patch_scenario.defender
    settings = ReverseSettings(steps=40, min_steps=20, batch_size=8, max_problems=2)
    problems = [
        Problem("patch", 0, (1, 2, 3, 4)),
        Problem("patch", 0, (1,)),
        Problem("perturbation", 2, (3,)),
        Problem("patch", 1, (0,)),
    ]
    groups = [g.tolist() for g in _groups(data, problems, settings)]
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert [0] in groups and all(len(g) <= 2 for g in groups)
    seen = []

    def forward(x, which):  # the classifier, told which problem each image belongs to
        seen.append(set(which.tolist()))
        return model(x)

    mixed = reverse_engineer(model, data, problems, (0.0, 1.0), settings, 5, forward=forward)
    assert [e.problem for e in mixed] == problems and {0} in seen
    for p, e in zip(problems, mixed, strict=True):
        alone = reverse_engineer(model, data, [p], (0.0, 1.0), settings, seed=5)[0]
        assert alone.size == e.size and alone.steps == e.steps


def test_a_confident_trigger_is_larger_and_gives_t_that_probability(model, patch_scenario):
    """With ``confidence`` an image counts as sent to t only where f gives t that probability:
    the trigger that does so is at least as large as the one that makes t f's answer."""
    data, p = patch_scenario.defender, Problem("perturbation", 2, (1,))
    plain, sure = (
        reverse_engineer(model, data, [p], (0.0, 1.0), ReverseSettings(confidence=c), seed=0)[0]
        for c in (0.0, 0.99)
    )
    assert plain.success >= 0.95 and sure.success >= 0.95 and sure.size > plain.size
    x = torch.from_numpy(data.x[data.y == 1])
    with torch.no_grad():
        probs = model(sure.apply(x, 0.0, 1.0)).softmax(1)[:, 2]
    assert (probs >= 0.99).float().mean() >= 0.95

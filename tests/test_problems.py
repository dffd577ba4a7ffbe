import numpy as np
import torch

from bna_export.problems import Pools, Problem, goal


def test_pools_whole_or_sampled_from_the_problem_own_schedule(patch_scenario):
    data = patch_scenario.defender
    problems = [Problem("patch", 0, (1,)), Problem("patch", 0, (1, 2, 3))]
    gens = [torch.Generator().manual_seed(p.seed(0)) for p in problems]
    pools = Pools(data, problems, 32, 5, gens)
    index, weight = pools.step(torch.tensor([0, 1]), 2)
    assert index.shape == weight.shape == (2, 32)
    ones = set(np.flatnonzero(data.y == 1).tolist())
    assert set(index[0][weight[0] > 0].tolist()) == ones and weight[0].sum() == len(ones)
    sampled = index[1].tolist()
    assert len(set(sampled)) == 32 and set(sampled) <= set(data.of_classes([1, 2, 3]).tolist())
    assert weight[1].all()
    flipped = problems[::-1]
    again = Pools(data, flipped, 32, 5, [torch.Generator().manual_seed(p.seed(0)) for p in flipped])
    assert torch.equal(again.step(torch.tensor([0]), 2)[0][0], index[1])


def test_goal_counts_a_hit_only_at_the_required_confidence():
    logits = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    target, away = torch.tensor([0, 0, 0]), torch.tensor([-1, -1, -1])
    loss, hit = goal(logits, target, away)
    assert hit.tolist() == [True, True, False]
    assert torch.equal(goal(logits, target, away, 0.9)[0], loss)  # the loss is the same
    # p = e²/(e² + 2) = 0.79 and e⁵/(e⁵ + 2) = 0.99
    assert goal(logits, target, away, 0.9)[1].tolist() == [False, True, False]

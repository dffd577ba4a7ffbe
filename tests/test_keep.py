"""The keep-t term's weight: fixed, or following g_t's flags on the defender's clean target
images, with each target's own budget."""

import pytest
import torch

from bna_export.keep import KeepWeight, keep_budgets
from bna_export.mitigated import predict_mitigated
from bna_export.settings import FitSettings


@pytest.fixture(scope="module")
def setup(patch_estimate):
    return patch_estimate


def test_the_keep_t_weight_follows_the_flags_on_clean_target_images(setup, patch_scenario):
    """With a flag budget, the keep-t weight grows while g_t flags more than the budget of the
    defender's clean target images (those f routes to g_t), shrinks otherwise, and stays
    within its range; with budget 0 it is fixed."""
    model, _ = setup
    data = patch_scenario.defender
    s = FitSettings(
        target_flag_budget=0.1, target_weight_step=2.0, target_weight_range=4.0, keep_margin=0.0
    )
    own = [la.f_theta()[None].clone() for la in model.layers]  # g_t = f: nothing flagged
    keep = KeepWeight(model, data, [[0]], s)
    for _ in range(3):
        keep.update(model, own)
    assert float(keep.flagged[0]) == 0.0 and float(keep.weight[0]) == s.target_ce_weight / 4
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 1.0, 2.0, 4.0):  # ever more disturbed Θ: the weight follows the flags
        noisy = [t + scale * torch.randn(t.shape, generator=gen) * t.abs().mean() for t in own]
        noisy = [torch.cat([t[:, :2], t[:, 2:].sort(1).values], 1) for t in noisy]  # υ <= ω
        before = float(keep.weight[0])
        keep.update(model, noisy)
        x = data.x[data.y == 0]
        pred = predict_mitigated(model, [0], noisy, x)
        routed = model(torch.from_numpy(x)).argmax(1).numpy() == 0
        share = pred.triggered[routed].mean()
        assert float(keep.flagged[0]) == pytest.approx(share)
        want = before * 2 if share > 0.1 else before / 2
        lo, hi = s.target_ce_weight / 4, s.target_ce_weight * 4
        assert float(keep.weight[0]) == pytest.approx(min(hi, max(lo, want)))
    # a shared group's keep term holds every one of its classes' images at their own class
    two = KeepWeight(model, data, [[0, 1]], s)
    assert set(two.label.tolist()) == {0, 1} and len(two.label) > len(keep.label)
    fixed = KeepWeight(model, data, [[0]], FitSettings(target_flag_budget=0.0))
    fixed.update(model, noisy)
    assert float(fixed.weight[0]) == FitSettings().target_ce_weight


def test_a_target_with_one_source_gets_the_one_source_budget():
    """The one-source budget goes to a target with one source outside a shared keep group,
    whose weight may not fall below the set weight; every other target keeps
    ``target_flag_budget`` and may fall to 1/range of it; 0 turns it off."""
    s = FitSettings(
        single_source_budget=0.05,
        target_flag_budget=0.0,
        target_weight_range=4.0,
        single_source_range=16.0,
    )
    w0 = s.target_ce_weight
    sources = {3: [1], 7: [0, 1, 2], 5: [4]}
    budgets, floors, ceilings = keep_budgets(s, [3, 7, 5], sources)
    assert (budgets, floors) == ([0.05, 0.0, 0.05], [w0, w0 / 4, w0])
    assert ceilings == [16 * w0, 4 * w0, 16 * w0]
    grouped = keep_budgets(s, [3, 7, 5], sources, keep={5: [4, 5]})
    assert grouped == ([0.05, 0.0, 0.0], [w0, w0 / 4, w0 / 4], [16 * w0, 4 * w0, 4 * w0])
    off = FitSettings(single_source_budget=0.0, target_flag_budget=0.1)
    assert keep_budgets(off, [3, 7], sources)[0] == [0.1, 0.1]
    assert FitSettings().single_source_budget > 0  # on by default, for one-source targets
    assert FitSettings().target_flag_budget == 0  # off for the others


def test_each_target_follows_its_own_budget(setup, patch_scenario):
    """Two targets under a Θ that clips every channel to 0 (g_t's answer is a constant, so
    clean images of some class are flagged): a target with a budget moves its weight with its
    own flags, one with budget 0 keeps the set weight."""
    model, _ = setup
    data = patch_scenario.defender
    s = FitSettings(target_weight_step=2.0, target_weight_range=4.0, keep_margin=0.0)
    flat = [la.f_theta()[None].clone() for la in model.layers]
    for t in flat:
        t[:, 2:] = 0.0  # υ = ω = 0
    two = [torch.cat([t, t]) for t in flat]
    w0 = s.target_ce_weight
    for budgets in ([0.01, 0.0], [0.0, 0.01]):
        keep = KeepWeight(model, data, [[0], [1]], s, budgets=budgets)
        assert keep.adaptive
        keep.update(model, two)
        assert float(keep.flagged.max()) > 0.01
        for i, b in enumerate(budgets):
            want = w0 if b == 0 else (2 * w0 if float(keep.flagged[i]) > b else w0 / 2)
            assert float(keep.weight[i]) == pytest.approx(want)
    none = KeepWeight(model, data, [[0], [1]], s, budgets=[0.0, 0.0])
    assert not none.adaptive
    # g_t = f flags nothing: a weight with a floor at the set weight stays there, one without
    # falls to 1/range of it
    own = [torch.cat([la.f_theta()[None]] * 2) for la in model.layers]
    keep = KeepWeight(model, data, [[0], [1]], s, budgets=[0.1, 0.1], floors=[w0, w0 / 4])
    for _ in range(3):
        keep.update(model, own)
    assert float(keep.flagged.max()) == 0.0
    assert keep.weight.tolist() == pytest.approx([w0, w0 / 4])


def test_an_image_kept_by_a_thin_margin_counts_as_flagged(setup, patch_scenario):
    """With ``keep_margin`` a kept image counts as flagged while g_t's logit of its class leads
    the next by less than the margin (g_t = f here: f's own margins), so the weight grows,
    up to its ceiling, on images g_t still answers right; with margin 0 only a changed answer
    counts."""
    model, _ = setup
    data = patch_scenario.defender
    own = [la.f_theta()[None].clone() for la in model.layers]
    x = torch.from_numpy(data.x[data.y == 0])
    with torch.no_grad():
        logits = model(x)
    routed = logits.argmax(1) == 0
    top2 = logits[routed].topk(2, dim=1).values
    margins = (top2[:, 0] - top2[:, 1]).sort().values
    half = len(margins) // 2
    cut = float(margins[half - 1] + margins[half]) / 2  # half of them below it, none near it
    w0 = FitSettings().target_ce_weight
    for margin, share in ((0.0, 0.0), (cut, float((margins < cut).float().mean()))):
        s = FitSettings(target_flag_budget=0.1, target_weight_step=2.0, keep_margin=margin)
        keep = KeepWeight(model, data, [[0]], s, floors=[w0], ceilings=[3 * w0])
        for _ in range(3):
            keep.update(model, own)
        assert float(keep.flagged[0]) == pytest.approx(share)
        assert float(keep.weight[0]) == (3 * w0 if share > 0.1 else w0)

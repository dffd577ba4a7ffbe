"""The PyTorch reference of the mitigated classifier: t's lead, the flag drops a fit sets, and
the routed answers with and without a drop."""

from __future__ import annotations

import numpy as np
import torch

from bna_export.mitigated import answer_mask, flag_drops, lead
from bna_export.model import adapt_module


def test_lead_is_t_over_the_best_other_allowed_class():
    logits = torch.tensor([[3.0, 5.0, 1.0, 4.0], [2.0, 0.0, 7.0, -1.0]])
    t = torch.tensor([1, 2])
    every = torch.ones((2, 4), dtype=torch.bool)
    assert lead(logits, t, every).tolist() == [1.0, 5.0]
    among = answer_mask([1, 2], [(2,), (3,)], 4)  # row 0: t 1 or 2; row 1: t 2 or 3
    assert lead(logits, t, among).tolist() == [4.0, 8.0]


def test_flag_drops_are_a_share_of_fs_median_lead_on_the_clean_images_of_t(patch_scenario):
    """Over every class; none for a target restricted to its sources, nor at share 0."""
    sc = patch_scenario
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    data = sc.defender
    assert flag_drops(model, data, [0, 3], [None, None], 0.0) == (0.0, 0.0)
    drops = flag_drops(model, data, [0, 3, 2], [None, None, (4,)], 0.5)
    assert drops[2] == 0.0
    with torch.no_grad():
        for d, t in zip(drops, [0, 3], strict=False):
            lf = model(torch.from_numpy(data.x[data.y == t])).numpy()
            lf = lf[lf.argmax(1) == t]
            others = np.delete(lf, t, 1).max(1)
            assert d > 0 and np.isclose(d, 0.5 * np.median(lf[:, t] - others), rtol=1e-5)

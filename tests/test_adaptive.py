import numpy as np
import torch

from bna_export.lab.adaptive import channel_w1
from bna_export.lab.scenario import build_scenario, synthetic_scenario_data
from bna_export.model import adapt_module


def test_channel_w1_compares_each_channels_values_as_a_distribution():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 3, 4, 4, generator=gen)
    assert float(channel_w1(a, a)) == 0.0
    # the same values in another order (other images, other positions): the same distribution
    assert float(channel_w1(a, a.flip(0).flip(3))) < 1e-6
    shift = torch.tensor([0.0, 1.0, 2.0])[None, :, None, None]
    assert abs(float(channel_w1(a, a + shift)) - 1.0) < 1e-5  # (0 + 1 + 2) / 3
    flat = torch.randn(16, 5, generator=gen)
    assert abs(float(channel_w1(flat, flat + 0.5)) - 0.5) < 1e-5


def _alteration(sc) -> float:
    """Mean over the BN layers of channel_w1 between f's outputs on the test sources, with and
    without the scenario's trigger (eval mode: f's own statistics)."""
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    x = sc.test.x[sc.test.y != sc.targets[0]][:200]
    outs = []
    for batch in (x, sc.trigger.apply(x)):
        with torch.no_grad(), model.capturing() as cap:
            model(torch.from_numpy(batch))
        outs.append([c[0] for c in cap])
    return float(np.mean([float(channel_w1(a, b)) for a, b in zip(*outs, strict=True)]))


def test_the_adaptive_attack_keeps_the_backdoor_and_lowers_the_alteration():
    x, y = synthetic_scenario_data()
    runs = {
        w: build_scenario(x, y, attack="patch", target=0, width=8, epochs=6, latent_weight=w)
        for w in (0.0, 0.2)
    }
    aligned = runs[0.2]
    history = aligned.info["alignment"]
    assert len(history) == 6 and all(np.isfinite(history))  # it grows as the backdoor takes
    assert "alignment" not in runs[0.0].info
    assert _alteration(aligned) < 0.7 * _alteration(runs[0.0])
    trig = aligned.triggered
    with torch.no_grad():
        hit = aligned.net(torch.from_numpy(trig["x"])).argmax(1).numpy() == trig["attack_label"]
        acc = aligned.net(torch.from_numpy(aligned.test.x)).argmax(1).numpy() == aligned.test.y
    assert hit.mean() > 0.8 and acc.mean() > 0.9

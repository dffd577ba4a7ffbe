"""f with its BatchNorms folded into the layers before them: the same logits and input
gradients as f, used only while f runs alone."""

import pytest
import torch

from bna_export.lab.architectures import make_classifier
from bna_export.model import adapt_graph_module


def _exported(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    net = make_classifier(arch, 3, 10, 16, width=8).eval()
    with torch.no_grad():  # f's own statistics, so that the fold is not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.rand(6, 3, 16, 16)
    ep = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    return adapt_graph_module(ep.module(), x[:2]), x


def _count_folded(model) -> int:
    return (
        sum(
            str(n.target).startswith("bna_folded_") and n.op == "get_attr"
            for n in model.alone.graph.nodes
        )
        // 2
    )


def _call_modules(gm) -> int:
    return sum(n.op == "call_module" for n in gm.graph.nodes)


@pytest.mark.parametrize(
    "arch", ["small-resnet", "preact-resnet18", "mobilenetv2-short", "vgg11-bn", "se-silu"]
)
def test_folded_f_gives_f_logits_and_gradients(arch):
    model, x = _exported(arch)
    assert model.alone is not None
    calls = []
    model.alone.register_forward_hook(lambda *_: calls.append(1))
    x = x.requires_grad_(True)
    fast = model(x)
    assert calls == [1]  # f alone ran the folded copy
    (g_fast,) = torch.autograd.grad(fast.logsumexp(1).sum(), x)
    with model.capturing() as captured:  # a capture needs the BatchNorms: the unfolded f
        plain = model(x)
    assert all(len(c) == 1 for c in captured) and calls == [1]
    (g_plain,) = torch.autograd.grad(plain.logsumexp(1).sum(), x)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)
    assert (g_fast - g_plain).norm() <= 1e-3 * g_plain.norm()
    assert _call_modules(model.alone) < _call_modules(model.net)


def test_only_a_batchnorm_right_after_its_layer_is_folded():
    model, _ = _exported("small-resnet")
    assert _count_folded(model) == len(model.layers) == 9  # every BN follows its conv
    assert _call_modules(model.alone) == 0
    pre, _ = _exported("preact-resnet18")
    # PreAct-ResNet's BNs that follow a residual Add (or the input of a block) stay BNs
    left = _call_modules(pre.alone)
    assert left > 0
    assert _count_folded(pre) + left == len(pre.layers)


def test_a_watched_layer_runs_the_full_f():
    model, x = _exported("small-resnet")
    seen = []
    handle = model.layers[0].register_forward_hook(lambda *_: seen.append(1))
    model(x)
    assert seen == [1]  # a hook on a BN layer fires: the folded copy has no such layer
    handle.remove()
    model(x)
    assert seen == [1]


def test_nothing_to_fold_keeps_f_alone():
    model, x = _exported("densenet")  # every BatchNorm reads a concatenation
    assert model.alone is None
    assert model(x).shape == (len(x), 10)


def test_the_full_f_runs_while_theta_is_set():
    model, x = _exported("small-resnet")
    thetas = [la.f_theta()[None].clone() for la in model.layers]
    for th in thetas:  # a tight clip: g differs from f
        th[:, 2], th[:, 3] = -0.1, 0.1
    route = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        f = model(x)
        with model.mitigated(thetas, route):
            g = model(x)
    assert not torch.allclose(f, g, atol=1e-3)

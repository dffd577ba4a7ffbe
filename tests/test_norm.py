"""BnaNorm's per-sample θ: the gradient the Θ fit follows is the same bits on every run."""

import torch

from bna_export.norm import BnaNorm


def test_routed_theta_gradient_is_reproducible():
    # Θ is picked per sample by the route; the backward of that pick must not add into θ's
    # gradient from several threads in any order (the fit of MobileNetV2 was not reproducible)
    gen = torch.Generator().manual_seed(0)
    c, t, n = 96, 3, 512
    layer = BnaNorm(
        torch.randn(c, generator=gen),
        torch.rand(c, generator=gen) + 0.5,
        torch.randn(c, generator=gen),
        torch.randn(c, generator=gen),
        1e-5,
        "bn",
    )
    z = torch.randn(n, c, 4, 4, generator=gen)
    route = torch.randint(-1, t, (n,), generator=gen)
    start = torch.stack([layer.f_theta()[:2]] * t)  # µ, σ of f per target
    bounds = torch.tensor([-1.0, 1.0]).view(1, 2, 1).expand(t, 2, c)
    theta0 = torch.cat([start, bounds], 1) + 0.1 * torch.randn(t, 4, c, generator=gen)
    threads = torch.get_num_threads()
    grads = []
    try:
        torch.set_num_threads(max(2, threads))
        for _ in range(4):
            theta = theta0.clone().requires_grad_(True)
            layer.theta, layer.route = theta, route
            (layer(z) * torch.linspace(-1, 1, n).view(n, 1, 1, 1)).sum().backward()
            grads.append(theta.grad)
    finally:
        torch.set_num_threads(threads)
        layer.theta, layer.route = None, None
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.equal(g, grads[0])

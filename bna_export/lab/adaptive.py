"""The adaptive attack against BNA (Doan et al. 2021, the paper's Sec. 5.4): a backdoor trained
to leave every BN channel's output distribution on triggered images as it is on the same images
without the trigger, the alteration that BNA measures and corrects."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


def channel_w1(clean: Tensor, triggered: Tensor) -> Tensor:
    """Mean over channels of the 1-D Wasserstein-1 distance between each channel's values on
    ``clean`` and on ``triggered`` ([N, C] or [N, C, H, W], the same shape; a conv channel's
    positions are samples of one distribution, as in BNA): sorted values compared."""
    c = clean.shape[1]
    a = clean.transpose(0, 1).reshape(c, -1).sort(1).values
    b = triggered.transpose(0, 1).reshape(c, -1).sort(1).values
    return (a - b).abs().mean()


def train_aligned(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    sources: np.ndarray,
    triggered: np.ndarray,
    *,
    weight: float,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train as :func:`~bna_export.lab.zoo.train_classifier` does (Adam, one-cycle, cross-entropy
    on the poisoned set ``x``, ``y``), plus ``weight`` times the mean over BN layers of
    :func:`channel_w1` between ``batch_size`` clean images ``sources`` and the same images
    with the trigger (``triggered``), both in the step's one forward pass, so that batch
    statistics normalise them together. Returns the model in eval mode and the mean alignment
    term of each epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    st, tt = torch.from_numpy(sources), torch.from_numpy(triggered)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    outputs: list[Tensor] = []
    # a copy: an in-place activation after the BN (ReLU(inplace=True)) must not change it
    hooks = [m.register_forward_hook(lambda _m, _i, o: outputs.append(o.clone())) for m in norms]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (-(-len(xt) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    history: list[float] = []
    model.train()
    try:
        for epoch in range(epochs):
            perm, terms = torch.randperm(len(xt), generator=gen), []
            for idx in torch.split(perm, batch_size):
                if len(idx) < 2:
                    continue
                pair = torch.randint(len(st), (batch_size,), generator=gen)
                n, m = len(idx), batch_size
                outputs.clear()
                logits = model(torch.cat([xt[idx], st[pair], tt[pair]]))
                align = torch.stack([channel_w1(o[n : n + m], o[n + m :]) for o in outputs]).mean()
                loss = nn.functional.cross_entropy(logits[:n], yt[idx]) + weight * align
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                terms.append(float(align.detach()))
            history.append(float(np.mean(terms)))
            if progress is not None:
                progress(epoch + 1, epochs)
    finally:
        for h in hooks:
            h.remove()
    return model.eval(), history

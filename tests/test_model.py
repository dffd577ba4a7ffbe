import numpy as np
import pytest
import torch
from torch import nn

from bna_export.errors import ModelError
from bna_export.lab.architectures import NormalizedInput
from bna_export.lab.scenario import export_model
from bna_export.lab.zoo import SmallCNN
from bna_export.model import adapt_graph_module, adapt_module, load_model


def trained_like(seed: int = 0) -> nn.Module:
    """A SmallCNN with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    net = SmallCNN(1, 5, 16, 8)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # negative γ too
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


X = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def test_module_adapter_keeps_f():
    net = trained_like()
    with torch.no_grad():
        ref = net(X)
    model = adapt_module(net, X[:2])
    assert [la.name for la in model.layers] == ["features.1", "features.5", "head.2"]
    with torch.no_grad():
        assert torch.allclose(model(X), ref, atol=1e-6)


def test_exported_program_adapter_keeps_f(tmp_path):
    net = trained_like()
    with torch.no_grad():
        ref = net(X)
    export_model(net, X.numpy(), tmp_path / "m.pt2")
    model = load_model(str(tmp_path / "m.pt2"), None, X[:2])
    assert len(model.layers) == 3
    assert [la.channels for la in model.layers] == [8, 16, 64]
    with torch.no_grad():
        assert torch.allclose(model(X), ref, atol=1e-5)
        assert model(X[:1]).shape == (1, 5)  # dynamic batch


@pytest.mark.parametrize("form", ["module", "pt2"])
def test_a_model_that_normalises_its_input_in_place_leaves_ours_alone(form, tmp_path):
    inner = trained_like()
    net = NormalizedInput(inner, (0.5,), (0.25,), inplace=True).eval()
    twin = NormalizedInput(inner, (0.5,), (0.25,)).eval()
    with torch.no_grad():
        ref = twin(X)
    if form == "pt2":
        export_model(net, X.numpy(), tmp_path / "m.pt2")
        model = load_model(str(tmp_path / "m.pt2"), None, X[:2].clone())
    else:
        model = adapt_module(net, X[:2].clone())
    x = X.clone()
    for channels_last in (False, True):
        model.channels_last = channels_last
        with torch.no_grad():
            first, second = model(x), model(x)
        assert torch.equal(x, X)  # not normalised again on every pass
        assert torch.allclose(first, ref, atol=1e-5) and torch.equal(first, second)


def test_theta_equal_to_f_gives_f_and_routes_per_sample():
    model = adapt_module(trained_like(), X[:2])
    thetas = [la.f_theta()[None].repeat(2, 1, 1) for la in model.layers]  # (T=2, 4, C)
    thetas = [th.clamp(-1e9, 1e9) for th in thetas]
    with torch.no_grad():
        ref = model(X)
        route = torch.tensor([-1, 0, 1, 0, -1, 1, 1])
        with model.mitigated(thetas, route):
            out = model(X)
    assert torch.allclose(out, ref, atol=1e-5)
    # a tight clip on target 1 changes exactly the rows routed to 1
    tight = [th.clone() for th in thetas]
    for th in tight:
        th[1, 2], th[1, 3] = -0.1, 0.1
    with torch.no_grad(), model.mitigated(tight, route):
        out = model(X)
    changed = (out - ref).abs().amax(1) > 1e-4
    assert changed.tolist() == (route == 1).tolist()


def test_h_is_the_paper_transform():
    model = adapt_module(trained_like(), X[:2])
    la = model.layers[0]
    z = torch.randn(4, la.channels, 3, 3)
    mu, sigma = torch.randn(la.channels), torch.rand(la.channels) + 0.5
    lo, hi = -torch.rand(la.channels), torch.rand(la.channels)
    la.theta = torch.stack([mu, sigma, lo, hi])[None]
    la.route = torch.zeros(4, dtype=torch.int64)
    out = la(z)
    la.theta = la.route = None
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    h = torch.maximum(torch.minimum((z - v(mu)) / v(sigma), v(hi)), v(lo))
    assert torch.allclose(out, h * v(la.weight) + v(la.bias), atol=1e-6)


def test_factory_with_weights(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    net = trained_like()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = load_model("tiny_models:make_cnn", tmp_path / "w.pt", X[:2])
    with torch.no_grad():
        assert torch.allclose(model(X), net(X), atol=1e-6)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("tiny_models:make_no_bn", "no BatchNorm"),
        ("tiny_models:make_not_a_module", "expected a torch.nn.Module"),
        ("tiny_models:missing", "cannot import"),
        ("no_such_module_xyz:f", "cannot import"),
        ("model.bin", "expected a .pt2 file"),
    ],
)
def test_bad_models_are_model_errors(spec, match, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(ModelError, match=match):
        load_model(spec, None, X[:2])


def test_wrong_weights_and_corrupt_archive(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ModelError, match="does not fit"):
        load_model("tiny_models:make_cnn", tmp_path / "w.pt", X[:2])
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"not a torch\.export archive"):
        load_model(str(tmp_path / "bad.pt2"), None, X[:2])


def test_wrong_input_shape_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="failed on an input"):
        adapt_module(trained_like(), torch.rand(2, 3, 16, 16))


def test_graph_adapter_handles_decomposed_batch_norm():
    net = trained_like()
    ep = torch.export.export(net, (X[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    ep = ep.run_decompositions()
    model = adapt_graph_module(ep.module(), X[:2])
    assert len(model.layers) == 3
    with torch.no_grad():
        np.testing.assert_allclose(model(X).numpy(), net(X).numpy(), atol=1e-5)

import dataclasses

import numpy as np
import pytest
import torch

from bna_export import artifact
from bna_export.data import Dataset
from bna_export.defend import Mitigation, fit_defence, resolve_sources
from bna_export.errors import BadInputError, FitFileError
from bna_export.model import adapt_module
from bna_export.settings import FitSettings, ReverseSettings, Settings

FAST = Settings(
    reverse=ReverseSettings(steps=60, min_steps=20, restarts=1), fit=FitSettings(epochs=2)
)


@pytest.fixture(scope="module")
def model(patch_scenario):
    return adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))


def test_sources():
    assert resolve_sources(4, [2], None) == {2: [0, 1, 3]}
    assert resolve_sources(4, None, [(0, 1), (3, 1), (2, 0)]) == {0: [2], 1: [0, 3]}
    with pytest.raises(BadInputError, match="does not exist"):
        resolve_sources(4, [4], None)
    with pytest.raises(BadInputError, match="exactly one"):
        resolve_sources(4, [1], [(0, 1)])


def test_same_inputs_and_seed_give_the_same_bytes(model, patch_scenario):
    a = fit_defence(model, patch_scenario.defender, targets=[0], settings=FAST)
    b = fit_defence(model, patch_scenario.defender, targets=[0], settings=FAST)
    assert artifact.encode(a.fit) == artifact.encode(b.fit)
    c = fit_defence(
        model, patch_scenario.defender, targets=[0], settings=dataclasses.replace(FAST, seed=1)
    )
    assert artifact.encode(a.fit) != artifact.encode(c.fit)


def test_fit_file_records_what_later_steps_need(model, patch_scenario):
    out = fit_defence(model, patch_scenario.defender, pairs=[(1, 0), (2, 0)], settings=FAST)
    h, t = out.fit.header, out.fit.tensors
    assert h["targets"] == [0] and h["sources"] == {"0": [1, 2]} and h["mode"] == "pairs"
    assert h["pairs"] == [[1, 0], [2, 0]] and h["attacked"] is True
    assert [la["channels"] for la in h["layers"]] == [8, 16, 64]
    n_probe = t["probe.x"].shape[0]
    assert t["probe.f_logits"].shape == (n_probe, 5)
    assert t["probe.g_logits"].shape == (1, n_probe, 5)
    # the probes' routed answers follow from f's and g's logits (design step 3)
    f_label = t["probe.f_logits"].argmax(1)
    g_label = t["probe.g_logits"][0].argmax(1)
    flag = (f_label == 0) & (g_label != 0)
    np.testing.assert_array_equal(t["probe.triggered"], flag)
    np.testing.assert_array_equal(t["probe.label"], np.where(flag, g_label, f_label))
    m = Mitigation.from_fit(artifact.decode(artifact.encode(out.fit)))
    m.check_model(model, out.fit)
    assert m.targets == [0] and m.input_shape == (1, 16, 16)


def test_input_checks(model, patch_scenario):
    d = patch_scenario.defender
    no_class_3 = Dataset(d.x[d.y != 3], d.y[d.y != 3])
    with pytest.raises(BadInputError, match="class 3 has no clean image"):
        fit_defence(model, no_class_3, targets=[0], settings=FAST)
    with pytest.raises(BadInputError, match="outside the input range"):
        fit_defence(model, d, targets=[0], settings=FAST, input_range=(0.2, 0.5))
    with pytest.raises(BadInputError, match="model has 5 classes"):
        fit_defence(model, Dataset(d.x, np.where(d.y == 4, 7, d.y)), targets=[0], settings=FAST)


def test_bad_theta_shape_is_a_fit_file_error(model, patch_scenario):
    out = fit_defence(model, patch_scenario.defender, targets=[0], settings=FAST)
    out.fit.tensors["theta.1"] = out.fit.tensors["theta.1"][:, :, :3]
    with pytest.raises(FitFileError, match=r"theta\.1"):
        Mitigation.from_fit(out.fit)

import dataclasses
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bna_export import artifact, fitfile
from bna_export.data import Dataset, load_npz
from bna_export.defend import fit_defence, resolve_sources
from bna_export.errors import BadInputError, FitFileError
from bna_export.export import build_graph
from bna_export.fitfile import Mitigation
from bna_export.lab.scenario import export_onnx
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module, load_model
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


def test_refreshed_triggers_are_recorded_with_their_round_whatever_the_grouping(
    model, patch_scenario
):
    """``fit.refresh_every``: re-solved triggers that still work on g_t join the fit and the fit
    file records their round; a target fitted in a group of its own gets the same rounds (and
    seeds) as one fitted with others."""
    fit = FitSettings(epochs=4, refresh_every=2)
    rounds = []
    for per_pass in (2, 1):
        s = dataclasses.replace(FAST, fit=dataclasses.replace(fit, targets_per_pass=per_pass))
        out = fit_defence(model, patch_scenario.defender, targets=[0, 1], settings=s)
        rounds.append(sorted((t["target"], t["refresh_round"]) for t in out.fit.header["triggers"]))
    assert rounds[0] == rounds[1]
    assert {r for _, r in rounds[0]} == {0, 1}  # one refresh (before epoch 2), and it was used


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
    m.check_model(model)
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


def detect(scenario, progress=None):
    model = adapt_module(scenario.net, torch.from_numpy(scenario.test.x[:2]))
    return model, fit_defence(model, scenario.defender, progress=progress)


def from_file(files, fit_path):
    """The model of a scenario's files and the fit file the CLI wrote for it (the outcome's
    ``fit``)."""
    x = load_npz(files["defender"])[0].x
    model = load_model(str(files["model"]), None, torch.from_numpy(x[:2]), torch.from_numpy(x))
    return model, SimpleNamespace(fit=artifact.load(fit_path))


@pytest.fixture(scope="module")
def a2o_detected(a2o_files, a2o_detected_file):
    """No hint, the all-to-one scenario: the fit file of the CLI's test (one fit for both)."""
    return from_file(a2o_files, a2o_detected_file[0])


def repaired(model, fit, triggered):
    """ASR and SIA of the mitigated model on triggered images."""
    m = Mitigation.from_fit(fit)
    pred = predict_mitigated(model, m.targets, m.thetas, triggered["x"], routing=m.routing)
    return (pred.label == triggered["attack_label"]).mean(), (pred.label == triggered["y"]).mean()


def test_all_to_one_target_is_found_and_repaired(a2o_scenario, a2o_detected):
    model, out = a2o_detected
    h = out.fit.header
    assert h["mode"] == "detect" and h["attacked"] is True and h["targets"] == [0]
    assert set(h["sources"]["0"]) <= set(range(1, 8)) and len(h["sources"]["0"]) >= 4
    # every pair of both families was scored, and the detected ones are all to target 0
    assert {f: len(v) for f, v in h["scores"].items()} == dict.fromkeys(
        Settings().detect_families, 56
    )
    assert all(t == 0 for _, t in h["detection"]["detected_pairs"])
    asr, sia = repaired(model, out.fit, a2o_scenario.triggered)
    assert asr < 0.1 and sia > 0.8


def test_fitting_from_the_deployed_onnx_matches_the_module(a2o_scenario, a2o_detected, tmp_path):
    """`fit --model model.onnx` (BN folded into the Convs by torch.onnx.export, weights in an
    external-data file): no hint, the same target and sources as the module, similar repair."""
    ref_model, ref = a2o_detected
    path = tmp_path / "model.onnx"
    export_onnx(a2o_scenario.net, a2o_scenario.test.x, path)
    assert (tmp_path / "model.onnx.data").exists()
    x = a2o_scenario.defender.x
    model = load_model(str(path), None, torch.from_numpy(x[:2]), torch.from_numpy(x))
    assert model.source == "onnx" and all(la.measured for la in model.layers)
    out = fit_defence(model, a2o_scenario.defender)
    h, h_ref = out.fit.header, ref.fit.header
    assert h["model_format"] == "onnx" and h_ref["model_format"] == "torch"
    assert h["targets"] == h_ref["targets"] == [0]
    src, src_ref = set(h["sources"]["0"]), set(h_ref["sources"]["0"])
    assert len(src & src_ref) >= len(src_ref) - 1, (src, src_ref)
    asr, sia = repaired(model, out.fit, a2o_scenario.triggered)
    asr_ref, sia_ref = repaired(ref_model, ref.fit, a2o_scenario.triggered)
    assert asr < 0.1 and sia > 0.8
    # within noise or better (here: ASR 0.3 % vs 9.1 %, SIA 99.7 % vs 90.9 %)
    assert asr <= asr_ref + 0.05 and sia >= sia_ref - 0.1, (asr, asr_ref, sia, sia_ref)


@pytest.fixture(scope="module")
def a2a_detected(a2a_scenario):
    """No hint, the all-to-all scenario: the model, the outcome and the progress events."""
    events = []
    model, out = detect(a2a_scenario, progress=lambda *e: events.append(e))
    return model, out, events


def test_all_to_all_pairs_are_found(a2a_detected):
    _, out, events = a2a_detected
    sweep = [e for e in events if e[0] == "sweep"]
    assert sweep[-1][1] == sweep[-1][2]
    assert sweep[-1][3] == "56/56 pairs, 8/8 pooled targets, universal done"
    assert [e[1] for e in sweep] == sorted(e[1] for e in sweep)  # never goes back
    assert {e[0] for e in events} >= {"sweep", "fit"}
    found = {tuple(p) for p in out.fit.header["detection"]["detected_pairs"]}
    true = {(s, (s + 1) % 8) for s in range(8)}
    # Pair by pair this found 4 of 8 on the Intel CPUs of earlier runs and 3 on an AMD EPYC;
    # with the all-to-all rule (each source's best pair, one source per target) all 8 here,
    # none wrong. A margin for other CPUs' rounding. README, Detection.
    assert found <= true and len(found) >= 6, sorted(found)
    assert {tuple(p) for p in out.fit.header["detection"]["all_to_all"]} <= true
    assert out.detection is not None and not out.detection.all_to_one
    # the all-to-all map: the perturbation family's universal trigger sends c to c + 1
    universal = out.fit.header["detection"]["sweep"]["universal"]
    assert set(universal) == {"patch", "perturbation", "blend"}
    dest = universal["perturbation"]["destinations"]
    assert sum(d == (c + 1) % 8 for c, d in enumerate(dest)) >= 6, dest
    # the mapped targets share one Θ (fit.map_shared), fitted on one universal trigger that
    # the fit file records as each one's own, from its source
    h, theta = out.fit.header, out.fit.tensors["theta.0"]
    shared = [i for i in range(len(theta)) if np.array_equal(theta[i], theta[0])]
    assert len(shared) >= 6, shared
    used = [tr for tr in h["triggers"] if tr["used"]]
    for i in shared:
        t = h["targets"][i]
        mine = [tr for tr in used if tr["target"] == t]
        assert mine and all(tr["sources"] == h["sources"][str(t)] for tr in mine)
        assert {tr["size"] for tr in mine} == {
            tr["size"] for tr in used if tr["target"] == h["targets"][0]
        }


def test_the_all_to_all_map_routes_among_its_sources_in_reference_and_graph(
    a2a_scenario, a2a_detected, tmp_path
):
    """The map's targets (fit.map_routing) are recorded as routed among their sources: g_t
    answers t or its source, whichever it prefers, so a flagged image is answered by its
    target's source; the built graph gives the same labels, flags and logits in ONNX Runtime."""
    model, out, _ = a2a_detected
    rec = fitfile.read(out.fit)
    shared = [t for t in rec.targets if len(rec.sources[t]) == 1]
    assert len(rec.source_routed) >= 6 and set(rec.source_routed) <= set(shared)
    m = Mitigation.from_fit(out.fit)
    x = np.concatenate([a2a_scenario.test.x, a2a_scenario.triggered["x"]])
    ref = predict_mitigated(model, m.targets, m.thetas, x, routing=m.routing)
    free = predict_mitigated(model, m.targets, m.thetas, x)
    with torch.no_grad():
        f_label = model(torch.from_numpy(x)).argmax(1).numpy()
    routed = np.isin(f_label, list(rec.source_routed))
    for i in np.flatnonzero(routed & ref.triggered):
        assert ref.label[i] in rec.sources[int(f_label[i])]
    assert not (ref.triggered & ~free.triggered).any()  # it only ever withdraws flags
    g_pick = free.logits[ref.triggered]  # where flagged, g_t's own logits
    np.testing.assert_array_equal(ref.logits[ref.triggered], g_pick)
    path = tmp_path / "model.onnx"
    export_onnx(a2a_scenario.net, a2a_scenario.test.x, path)
    built = build_graph(path, out.fit)
    sess = ort.InferenceSession(built.data, providers=["CPUExecutionProvider"])
    label, flag, logits = sess.run(None, {sess.get_inputs()[0].name: x})
    np.testing.assert_array_equal(label, ref.label)
    np.testing.assert_array_equal(flag, ref.triggered)
    np.testing.assert_allclose(logits, ref.logits, atol=1e-4, rtol=0)


def test_a_clean_model_gives_no_detection_and_an_unchanged_f(
    clean_scenario, clean_files, clean_detected_file
):
    model, out = from_file(clean_files, clean_detected_file[0])
    h, t = out.fit.header, out.fit.tensors
    assert h["attacked"] is False and h["targets"] == [] and h["pairs"] == []
    assert h["detection"]["detected_pairs"] == [] and h["detection"]["scores_computed"]
    assert t["theta.0"].shape == (0, 4, 8) and t["probe.g_logits"].shape[0] == 0
    m = Mitigation.from_fit(artifact.decode(artifact.encode(out.fit)))
    x = clean_scenario.test.x[:64]
    pred = predict_mitigated(model, m.targets, m.thetas, x, routing=m.routing)
    with torch.no_grad():
        np.testing.assert_array_equal(pred.label, model(torch.from_numpy(x)).argmax(1).numpy())
    assert not pred.triggered.any()

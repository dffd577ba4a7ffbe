import numpy as np
import pytest

from bna_export import artifact, fitfile
from bna_export.errors import FitFileError

FORGED_AUDIT = {
    "clean": True,
    "findings": [{"node": "n", "op": "If", "reason": "r"}],
    "detached_outputs": [],
}


def test_a_record_writes_back_the_bytes_it_was_read_from(a2o_detected_file, fitted):
    for path in (a2o_detected_file[0], fitted[0]):
        fit = artifact.load(path)
        rec = fitfile.read(fit)
        assert artifact.encode(fitfile.to_fit(rec)) == artifact.encode(fit)
    rec = fitfile.load(a2o_detected_file[0])
    assert rec.mode == "detect" and rec.targets == [0] and rec.detection.scores_computed
    assert all(t == 0 for _, t in rec.detection.detected_pairs)
    assert rec.pairs == [(s, 0) for s in rec.sources[0]]
    assert all(la.theta.shape == (1, 4, la.channels) for la in rec.layers)
    assert rec.probes is not None and rec.probes.g_logits.shape[0] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, t: h.pop("targets"), "has no 'targets'"),
        (lambda h, t: h.update(n_classes="5"), "n_classes is not an integer"),
        (lambda h, t: h["triggers"][0].update(size=None), r"triggers\[0\].size is not a number"),
        (lambda h, t: h["detection"].update(pair_families={"0-1": "patch"}), "SOURCE:TARGET"),
        (lambda h, t: h["sources"].update({"0": [1, "2"]}), r"sources.0\[1\]"),
        (lambda h, t: t.pop("layer.1.weight"), "lacks the tensor 'layer.1.weight'"),
        (lambda h, t: t.update({"theta.0": np.zeros((2, 4, 8), np.float32)}), "theta.0"),
        (lambda h, t: t.update({"probe.label": np.zeros(1, np.int64)}), "disagree in length"),
        (lambda h, t: t.update({"probe.x": np.zeros((), np.float32)}), "wrong rank"),
        (lambda h, t: h["targets"].append(h["targets"][0]), "a target is listed twice"),
        (lambda h, t: h["detection"].update(threshold=0), "threshold is not a positive number"),
        (lambda h, t: h["evidence"].update(model_sha256="abc"), "is not a SHA-256"),
        (lambda h, t: h["evidence"].pop("divergence"), "evidence has no 'divergence'"),
        (lambda h, t: h["evidence"].update(audit=FORGED_AUDIT), "audit.clean disagrees"),
        (lambda h, t: t.pop("divergence.after"), "'divergence.after' is missing"),
        (lambda h, t: t.update({"divergence.before": np.zeros((2, 3), np.float32)}), "shape"),
        (lambda h, t: t.update({"probe.truth": np.zeros(1, np.int64)}), "disagree in length"),
        (lambda h, t: t.update({"probe.trigger_of": np.zeros((2, 2), np.int64)}), "wrong rank"),
        (lambda h, t: h["detection"].update(all_to_one={"99": "patch"}), "class 99, outside"),
        (lambda h, t: h["scores"]["patch"][0].update(source=-1), "scores name class -1"),
        (lambda h, t: h["triggers"][0].update(sources=[0, 10]), "triggers name class 10"),
        (lambda h, t: h.update(n_classes=0), "n_classes is not a positive number"),
        (lambda h, t: h.update(source_routed=[9]), "source_routed names a class that is not a"),
        (lambda h, t: h.update(source_routed="0"), "source_routed is not a list"),
        (lambda h, t: h.update(flag_drops=[1.0, 2.0]), "flag_drops is not one finite number"),
        (lambda h, t: h.update(flag_drops=[-1.0]), "flag_drops is not one finite number"),
        (lambda h, t: h.update(flag_drops=["1"]), r"flag_drops\[0\] is not a number"),
        (lambda h, t: h["detection"].update(natural={"9": {"blend": 0.5}}), "class 9, outside"),
        (lambda h, t: h["detection"].update(natural={"0": {"blend": "x"}}), "natural.0 is not a"),
        (lambda h, t: h["detection"].update(natural={"0": [0.5]}), "natural.0 is not a"),
        (lambda h, t: h["detection"].update(natural_dropped=["1"]), r"dropped\[0\] is not an"),
    ],
)
def test_a_malformed_fit_file_is_one_error_naming_the_field(fitted, change, message):
    fit = artifact.decode(fitted[0].read_bytes())
    change(fit.header, fit.tensors)
    with pytest.raises(FitFileError, match=message):
        fitfile.read(artifact.decode(artifact.encode(fit)))


def test_a_fit_file_from_before_the_sweep_record_is_still_read(fitted):
    fit = artifact.decode(fitted[0].read_bytes())
    fit.header["detection"].pop("sweep")
    fit.header.pop("source_routed")  # and from before routing among sources: none routed so
    fit.header.pop("flag_drops")  # and from before flag drops: the paper's rule
    fit.header["detection"].pop("natural")  # and from before the natural-feature check
    fit.header["detection"].pop("natural_dropped")
    rec = fitfile.read(artifact.decode(artifact.encode(fit)))
    assert rec.detection.sweep == {} and rec.targets == fitfile.load(fitted[0]).targets
    assert rec.source_routed == () and rec.answers == [None] * len(rec.targets)
    assert rec.routing.drops == (0.0,) * len(rec.targets)
    assert rec.detection.natural == {} and rec.detection.natural_dropped == ()

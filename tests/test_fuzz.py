"""Property-based fuzzing (hypothesis) of every reader of untrusted files: random bytes, and
valid files with bytes flipped, cut or inserted, give a result or the tool's own input error,
never anything else (``fuzz/targets.py``; the coverage-guided twin is ``fuzz/fuzz_inputs.py``)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from targets import READERS, one_input, seeds

from bna_export.pt2file import check_archive

SEEDS = seeds()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_seeds_are_read_without_error():
    from targets import read_data, read_fit

    read_fit(SEEDS["fit"][1:])
    read_data(SEEDS["npz"][1:], ".npz")
    read_data(SEEDS["npy"][1:], ".npy")
    check_archive(SEEDS["pt2"][1:], "model.pt2")  # a valid archive passes the check


@FAST
@given(reader=st.sampled_from(range(len(READERS))), body=st.binary(max_size=2048))
def test_random_bytes(reader, body):
    one_input(bytes([reader]) + body)


@st.composite
def mutated(draw):
    buf = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "digit"]))
        if len(buf) < 2:
            break
        at = draw(st.integers(1, len(buf) - 1))
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif buf[at : at + 1].isdigit():  # a number in a JSON or .npy header: make it huge
            buf[at:at] = b"9999999999"
    return bytes(buf)


@FAST
@given(buf=mutated())
def test_mutated_valid_files(buf):
    one_input(buf)


def test_every_number_of_the_fit_file_changed_to_every_digit():
    """A class number changed by one digit (the mutation that found a target beyond the pairs'
    classes in the report): every such file is read, reported or refused, one digit at a time."""
    fit = SEEDS["fit"]
    at = [i for i in range(1, len(fit)) if fit[i : i + 1].isdigit()]
    assert len(at) > 50
    for i in at:
        for d in b"0123456789":
            one_input(fit[:i] + bytes([d]) + fit[i + 1 :])

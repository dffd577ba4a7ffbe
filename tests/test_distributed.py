"""The pair sweep sharded over processes with torchrun gives the result of one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bna_export.artifact import decode
from bna_export.distributed import Shard, resolve_device
from bna_export.errors import BadInputError

FAST = [
    "--set",
    "reverse.steps=300",
    "--set",
    "sweep.steps=120",
    "--set",
    "sweep.blend_steps=60",
    "--restarts",
    "1",
    "--epochs",
    "2",
    "--quiet",
    "--json",
]


def test_shards_interleave_and_cover_every_problem():
    shards = [Shard(r, 3) for r in range(3)]
    got = sorted(i for s in shards for i in s.mine(10))
    assert got == list(range(10)) and shards[1].mine(10) == [1, 4, 7]
    assert Shard().primary and not shards[2].primary


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    with pytest.raises(BadInputError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_bad_input():
    with pytest.raises(BadInputError, match="sees no CUDA GPU"):
        resolve_device("cuda")


def run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default for several ranks
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_fit_file_of_one_process(patch_files, tmp_path):
    args = ["fit", "--model", str(patch_files["model"]), "--data", str(patch_files["defender"])]
    cli = ["-m", "bna_export.cli.main", *args, *FAST]
    one = run(sys.executable, *cli, "-o", str(tmp_path / "one.bna"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = run(*torchrun, "--nproc-per-node", "2", *cli, "-o", str(tmp_path / "two.bna"))
    report, alone = json.loads(two.stdout), json.loads(one.stdout)  # only rank 0 prints
    assert report["ranks"] == 2 and report["targets"] == alone["targets"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.bna", "two.bna"]
    a, b = (decode((tmp_path / n).read_bytes()).header for n in ("one.bna", "two.bna"))
    assert a["pairs"] == b["pairs"] and a["sources"] == b["sources"]
    # each problem's estimate is independent of the others it is solved with up to float
    # rounding: convolution kernels may round an image differently with another batch around
    # it (seen on AMD EPYC, not on the Intel CPUs of earlier runs, where the files were
    # byte-identical), and an optimisation of a few hundred steps carries that a little further
    for fam in a["scores"]:
        za = np.array([r["size"] for r in a["scores"][fam]])
        zb = np.array([r["size"] for r in b["scores"][fam]])
        assert np.median(np.abs(za - zb) / za) < 1e-3 and np.all(np.abs(za - zb) < 0.05 * za)

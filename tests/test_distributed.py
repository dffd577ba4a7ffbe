"""The pair sweep sharded over processes with torchrun gives the result of one process."""

import json
import os
import subprocess
import sys

import pytest

from bna_export.distributed import Shard

FAST = [
    "--set",
    "reverse.steps=300",
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
    report = json.loads(two.stdout)  # only rank 0 prints
    assert report["ranks"] == 2 and report["targets"] == json.loads(one.stdout)["targets"]
    assert (tmp_path / "one.bna").read_bytes() == (tmp_path / "two.bna").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.bna", "two.bna"]

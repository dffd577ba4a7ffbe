import subprocess
import sys

import numpy as np
import pytest

from bna_export.errors import BadInputError
from bna_export.onnxfile import load_built
from bna_export.runtime import open_built, run_built

SERVE = """
import sys
import numpy as np
from bna_export.runtime import open_built, run_built
sess, meta = open_built(sys.argv[1])
out = run_built(sess, np.load(sys.argv[2]), batch_size=7)
np.save(sys.argv[3], out.label)
heavy = sorted(m for m in ("torch", "onnx", "onnx_ir", "click") if m in sys.modules)
print(",".join(heavy) or "none")
"""


@pytest.fixture(scope="module")
def graph(built_files):
    return built_files[:2]


def test_serving_needs_neither_torch_nor_onnx(graph, patch_scenario, tmp_path):
    x = np.concatenate([patch_scenario.test.x[:20], patch_scenario.triggered["x"][:20]])
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", SERVE, graph[1], tmp_path / "x.npy", tmp_path / "label.npy"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "none", done.stdout
    expect = run_built(open_built(graph[1])[0], x).label
    np.testing.assert_array_equal(np.load(tmp_path / "label.npy"), expect)


def test_a_plain_model_is_not_a_built_graph(graph):
    with pytest.raises(BadInputError, match="not a graph made by `bna-export build`"):
        open_built(graph[0])
    with pytest.raises(BadInputError, match="not a graph made by"):
        load_built(graph[0])  # the checked reader the command line uses


def test_a_graph_that_cannot_be_read_is_one_error(tmp_path):
    with pytest.raises(BadInputError, match="cannot read it"):
        open_built(tmp_path / "missing.onnx")

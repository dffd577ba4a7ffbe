import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import export_onnx

from bna_export import artifact
from bna_export.errors import BadInputError
from bna_export.export import build_graph
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
def graph(patch_scenario, fitted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    example = torch.from_numpy(patch_scenario.test.x[:2])
    onnx_path = export_onnx(patch_scenario.net, example, folder / "f.onnx", "dynamo")
    out = folder / "repaired.onnx"
    out.write_bytes(build_graph(onnx_path, artifact.load(fitted[0])).data)
    return onnx_path, out


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

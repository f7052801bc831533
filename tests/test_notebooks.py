"""notebooks/: each executes end to end in its small mode (NEOX_JAX_NOTEBOOK_SMALL=1), the sharding notebook's
table keeps its invariants, and the notebooks are stored without outputs."""

import json
import os
from pathlib import Path

import pytest

from .conftest import require

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GiB = 2**30


def execute(name: str):
    """Run a notebook in a fresh kernel in its small mode; returns the executed notebook."""
    nbformat, nbclient = require("nbformat", "notebooks"), require("nbclient", "notebooks")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel emulates its own devices (not the 8 of this process's XLA_FLAGS) and draws inline
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env.update(NEOX_JAX_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    return nb


@pytest.fixture(scope="module")
def layouts():
    nb = execute("sharding_layouts.ipynb")
    cell = next(c for c in nb.cells if "layout-table" in c.metadata.get("tags", ()))
    data = next(o["data"] for o in cell.outputs if "application/json" in o.get("data", {}))
    return {row["name"]: row for row in data["application/json"]["layouts"]}


@pytest.mark.slow
def test_sharding_notebook_table_keeps_its_invariants(layouts):
    named = {"(12,4,2)", "(96,1,1) FSDP", "(96,1,1)", "(24,1,4)", "(12,2,4)", "(6,4,4)", "(48,1,2)", "(6,2,8)",
             "(24,4,1)"}
    assert named <= set(layouts)
    for name, row in layouts.items():
        assert row["data"] * row["pipe"] * row["tensor"] == row["devices"] == 96, name
        assert row["global_batch"] == 1536, name  # every layout runs the paper's batch
        # the working weights one device holds x devices / the copies of each byte = the model's bf16 weights
        assert row["params"] * row["devices"] / row["replication"] == pytest.approx(row["model_bytes"], rel=1e-9)
        assert row["inside_node"] + row["across_nodes"] == pytest.approx(sum(row["traffic"].values()))
        assert row["step_s"] > row["compute_s"] > 0
    paper, zero1, fsdp = layouts["(12,4,2)"], layouts["(96,1,1)"], layouts["(96,1,1) FSDP"]
    assert paper["fits_analytically"] and paper["analytic_total"] <= 40 * GiB
    assert not zero1["fits_analytically"] and not zero1["fits_xla"]
    assert fsdp["traffic"]["data"] > zero1["traffic"]["data"]
    assert fsdp["replication"] == pytest.approx(1.0) and zero1["replication"] == pytest.approx(96.0)
    # the paper's layout keeps tensor and pipe inside a node: only the data reduction crosses nodes
    assert paper["across_nodes"] == pytest.approx(paper["traffic"]["data"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pythia_in_jax.ipynb", "train_on_a_cpu_mesh.ipynb"])
def test_notebook_executes_in_its_small_mode(name):
    nb = execute(name)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 1  # its plots were drawn


def test_notebooks_are_stored_without_outputs():
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in notebooks} >= {"sharding_layouts.ipynb", "pythia_in_jax.ipynb",
                                           "train_on_a_cpu_mesh.ipynb"}
    for path in notebooks:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: strip its outputs"

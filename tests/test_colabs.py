"""The notebooks run top to bottom on a CPU kernel, as a Colab CPU runtime would run them; any failing cell
fails the test (nbclient raises CellExecutionError)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")


@pytest.mark.parametrize("name", ["quickstart", "pruning_walkthrough", "hf_import"])
def test_notebook_runs_top_to_bottom(name, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # one CPU device, as on Colab
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  book = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
  NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": COLABS}}).execute()
  outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  if name != "hf_import":  # the report table / the plots are shown inline
    assert any("image/png" in o.get("data", {}) for o in outputs)

"""examples/colab_failover.ipynb runs top to bottom, headless on CPU (nbclient), at the small
sizes of its QUICK parameter and from this checkout (INSTALL = False): the failover plot shows
inline, the demo model streams text, and the text after killing workers is the text before."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
    """Run in a scratch directory (the notebook writes its plot and JSON where it runs), with this
    checkout importable, as an installed package would be."""
    nb = nbformat.read(os.path.join(ROOT, "examples", "colab_failover.ipynb"), as_version=4)
    params, = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = "INSTALL = False\nQUICK = True\nREPO = ''"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "failover.png").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "identical: True" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)             # the plot, inline
    assert "aw0 detected by" in text or "ew1 detected by" in text

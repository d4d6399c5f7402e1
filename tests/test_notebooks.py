"""Every notebook under notebooks/ runs headless (nbclient) against small
simulator studies made here, with no error and every figure drawn; without
matplotlib a notebook stops at its first code cell, saying what to install.
The notebooks are committed without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from tests.test_cli import invoke, ok

nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: Figures each notebook draws (PNG outputs) from the studies below.
FIGURES = {"pareto_fronts.ipynb": 3, "figures.ipynb": 3}


@pytest.fixture(scope="module")
def figure_dir(fig10_small, tmp_path_factory) -> Path:
    """fig10 (two pareto studies, 4 trials each) and fig12 (one sweep) in one folder, small."""
    out = shutil.copytree(fig10_small[0], tmp_path_factory.mktemp("figures") / "out")
    ok(invoke("figure", "fig12", "--tasklets", "1,8,33", "--out", out))
    return out


def _run(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    """What the cells printed or showed as text."""
    return "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "")
                   for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def _pngs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)
    for name in FIGURES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert 'pip install -e ".[notebook]"' in code[0].source  # the first cell checks the plotting needs


def test_pareto_fronts_draws_a_stored_pareto_study(figure_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_STUDY", str(figure_dir / "studies" / "llmstation-fig10-0.88rps-pareto-sim.db"))
    nb = _run("pareto_fronts.ipynb", tmp_path)
    assert _pngs(nb) == FIGURES["pareto_fronts.ipynb"]
    text = _text(nb)
    assert "study llmstation-fig10-0.88rps-pareto-sim: 4 trials" in text
    assert "Pareto-optimal feasible trials" in text and "Pareto" in text.split("forward_tasklets")[-1]


def test_figures_redraws_a_figure_folder(figure_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FIGURE_DIR", str(figure_dir))
    nb = _run("figures.ipynb", tmp_path)
    assert _pngs(nb) == FIGURES["figures.ipynb"]
    text = _text(nb)
    assert "fig10: 2 studies, 8 trials" in text and "fig12: 1 studies, 3 trials" in text
    assert "trade-off curves" in text and "65 (33+32)" in text  # each figure's numbers, as the command prints


def test_without_matplotlib_a_notebook_stops_at_its_first_cell(tmp_path, monkeypatch):
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named \'matplotlib\'", name="matplotlib")\n')
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    monkeypatch.setenv("AUTOTUNE_FIGURE_DIR", str(tmp_path / "nothing-here"))
    nb = nbformat.read(NOTEBOOKS / "figures.ipynb", as_version=4)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as stopped:
        nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert 'matplotlib is missing): pip install -e ".[notebook]"' in str(stopped.value)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].outputs and not any(c.outputs for c in code[1:])  # nothing after the first cell ran

"""The tutorial notebooks run top to bottom (headless, nbclient), so they cannot rot."""

import time
from pathlib import Path

import nbclient
import nbformat
import pytest

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorial"


def execute(path: Path) -> tuple[nbformat.NotebookNode, float]:
    notebook = nbformat.read(path, as_version=4)
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook, time.time() - start


def printed(notebook) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))


def images(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_exercise_notebook_runs_every_check_and_reports_what_is_missing():
    """The notebook front-end of tutorial/exercises: each exercise's check, then the score
    (the stubs as handed out: nothing implemented yet)."""
    notebook, _ = execute(TUTORIAL / "exercises" / "exercises.ipynb")
    text = printed(notebook)
    assert text.count(" not implemented yet: ") == 2 * 15 and "score: 0/15" in text


@pytest.mark.parametrize("name, min_images", [("01_detect", 1), ("02_anatomy", 3), ("03_conditional_attention", 5),
                                              ("04_training", 2)])
def test_walkthrough_runs_and_draws(name, min_images):
    notebook, seconds = execute(TUTORIAL / f"{name}.ipynb")
    assert images(notebook) >= min_images
    if name == "03_conditional_attention":   # the attention explorer, inline
        assert any("explain-data" in out.get("data", {}).get("text/html", "") for cell in notebook.cells
                   if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert seconds < 180, f"{name} took {seconds:.0f} s; the tutorial promises about two minutes on a laptop CPU"

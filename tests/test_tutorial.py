"""The tutorial notebooks run top to bottom (headless, nbclient), so they cannot rot. They are
executed once, side by side (each in its own kernel), and the tests read what they printed and
drew."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbclient
import nbformat
import pytest

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorial"
NOTEBOOKS = ["exercises/exercises.ipynb", "04_training.ipynb", "03_conditional_attention.ipynb", "01_detect.ipynb",
             "02_anatomy.ipynb"]


def execute(path: Path) -> tuple[nbformat.NotebookNode, float]:
    notebook = nbformat.read(path, as_version=4)
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook, time.time() - start


@pytest.fixture(scope="module")
def executed() -> dict:
    """Every notebook, executed: {name: (notebook, seconds) or the exception it raised}. The
    kernels spend much of their time starting and importing, so they run side by side."""
    def attempt(name):
        try:
            return execute(TUTORIAL / name)
        except Exception as e:   # reported by the test of that notebook
            return e
    with ThreadPoolExecutor(max_workers=len(NOTEBOOKS)) as pool:
        return dict(zip(NOTEBOOKS, pool.map(attempt, NOTEBOOKS)))


def result(executed: dict, name: str) -> tuple[nbformat.NotebookNode, float]:
    if isinstance(executed[name], Exception):
        raise executed[name]
    return executed[name]


def printed(notebook) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))


def images(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_exercise_notebook_runs_every_check_and_reports_what_is_missing(executed):
    """The notebook front-end of tutorial/exercises: each exercise's check, then the score
    (the stubs as handed out: nothing implemented yet)."""
    notebook, _ = result(executed, "exercises/exercises.ipynb")
    text = printed(notebook)
    assert text.count(" not implemented yet: ") == 2 * 15 and "score: 0/26 points (0 of 15 exercises correct)" in text


@pytest.mark.parametrize("name, min_images", [("01_detect", 1), ("02_anatomy", 3), ("03_conditional_attention", 5),
                                              ("04_training", 2)])
def test_walkthrough_runs_and_draws(executed, name, min_images):
    notebook, seconds = result(executed, f"{name}.ipynb")
    assert images(notebook) >= min_images
    if name == "03_conditional_attention":   # the attention explorer, inline
        assert any("explain-data" in out.get("data", {}).get("text/html", "") for cell in notebook.cells
                   if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert seconds < 180, f"{name} took {seconds:.0f} s, side by side with the other notebooks; the tutorial " \
                          f"promises a few minutes at most on a CPU"

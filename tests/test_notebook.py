"""examples/quickstart.ipynb runs top to bottom in a fresh kernel (from the repository root, on CPU)
and shows what it promises: a decreasing loss, a generated answer, option scores and the laws plot."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "examples" / "quickstart.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed (stream outputs)."""
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def _has_png(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.outputs
               if output.output_type in ("display_data", "execute_result"))


def test_quickstart_runs_and_shows_answers_and_laws_plot(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits conftest's environment (JAX on CPU); its working directory, the repo root, is on its
    # path, so the notebook imports wings_jax and train as a reader who opens it there would.
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors

    losses = re.search(r"loss ([\d. ]+) \.\.\. ([\d.]+)", "".join(map(_text, code)))
    assert losses, "the training cell should print its losses"
    first, last = float(losses.group(1).split()[0]), float(losses.group(2))
    assert last < first, f"a few steps of training should lower the loss ({first} -> {last})"

    answer_cell = next(cell for cell in code if "assistant.answer(" in cell.source)
    assert re.search(r"^answer: '.*'$", _text(answer_cell), re.MULTILINE)
    assert re.search(r"^scores: \{'Red\.': -[\d.]+, 'Green\.'", _text(answer_cell), re.MULTILINE)

    laws_cell = next(cell for cell in code if "laws_figure(" in cell.source)
    assert re.search(r"8 conversations, attention shift [\d.]+", _text(laws_cell))
    assert _has_png(laws_cell), "the MLLM-Laws cell should display its plot"

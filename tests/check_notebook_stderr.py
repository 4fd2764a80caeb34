"""Every notebook, run as JupyterLab runs it, shows no stderr that its stored copy lacks.

nbval (and ``make notebooks``) cannot see output that a library writes straight to the process's
file descriptor 2, such as torch's profiler lines: ipykernel forwards fd-level output only when
it is not under pytest (it checks ``PYTEST_CURRENT_TEST``), and the stored outputs are made with
``capture_fd_output=False`` to match. JupyterLab does forward it, as a pink stderr box. So this
check starts each kernel as JupyterLab would (fd capture on, no pytest variables) and fails on
any stderr text in a cell whose stored output does not have it.

Not collected by ``pytest tests`` (no ``test_`` prefix): ``make test-portable`` runs it, since it
executes every notebook once more (in its own copy of notebooks/, named by LOWVRAM_NOTEBOOKS_DIR).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# LOWVRAM_NOTEBOOKS_DIR: a copy of notebooks/ to run instead (make test-portable gives each of its
# passes its own copy, so that passes running side by side do not share runs/)
NOTEBOOKS_DIR = Path(os.environ.get("LOWVRAM_NOTEBOOKS_DIR")
                     or Path(__file__).resolve().parents[1] / "notebooks").resolve()
NOTEBOOKS = sorted(NOTEBOOKS_DIR.rglob("*.ipynb"))


def _sanitizers() -> list[tuple[re.Pattern[str], str]]:
    """The (regex, replacement) pairs of notebooks/sanitize.cfg, the ones nbval applies."""
    lines = (NOTEBOOKS_DIR / "sanitize.cfg").read_text().splitlines()
    pairs, pattern = [], None
    for line in lines:
        if line.startswith("regex:"):
            pattern = re.compile(line[len("regex:") :].strip())
        elif line.startswith("replace:") and pattern is not None:
            pairs.append((pattern, line[len("replace:") :].strip()))
            pattern = None
    return pairs


def _stderr_lines(cell: dict, sanitizers: list[tuple[re.Pattern[str], str]]) -> list[str]:
    text = "".join(
        out.get("text", "")
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stderr"
    )
    text = re.sub(r"[^\n]*\r", "", text)  # a progress bar's rewrites: keep its last state
    for pattern, replacement in sanitizers:
        text = pattern.sub(replacement, text)
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_unexpected_stderr_with_fd_capture(path: Path) -> None:
    stored = nbformat.read(path, as_version=4)
    fresh = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    client = NotebookClient(
        fresh,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        allow_errors=True,  # cells tagged raises-exception; nbval checks the rest
    )
    client.extra_arguments = ["--IPKernelApp.capture_fd_output=True"]
    client.execute(env=env)
    sanitizers = _sanitizers()
    unexpected = []
    for index, (old, new) in enumerate(zip(stored.cells, fresh.cells, strict=True)):
        if new.cell_type != "code":
            continue
        extra = [line for line in _stderr_lines(new, sanitizers)
                 if line not in _stderr_lines(old, sanitizers)]
        if extra:
            unexpected.append(f"cell {index}: " + " | ".join(extra[:3]))
    assert not unexpected, "stderr that the stored notebook does not show:\n" + "\n".join(
        unexpected
    )

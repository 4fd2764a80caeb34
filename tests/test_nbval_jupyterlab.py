"""The JupyterLab-like nbval pass (``tests/nbval_jupyterlab.py``) sees what nbval alone misses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]


def _notebook(path: Path) -> None:
    """Stored outputs as a kernel without fd capture makes them: no fd-level text anywhere."""
    v4 = nbformat.v4
    cells = [
        ("import os\nprint('hi')", [v4.new_output("stream", name="stdout", text="hi\n")]),
        # a library's warning written to fd 2, in a cell nbval does not compare (a training log)
        ("# NBVAL_IGNORE_OUTPUT\nos.write(2, b'fd-level warning\\n')\nprint(1)", []),
        # the same in a compared cell
        ("_ = os.write(2, b'a C library speaks\\n')", []),
        # a Python-level warning in a cell nbval does not compare
        ("# NBVAL_IGNORE_OUTPUT\nimport sys\nprint('UserWarning: new', file=sys.stderr)", []),
        # stderr the stored cell has too (a progress bar): expected, so fine
        ("# NBVAL_IGNORE_OUTPUT\nprint('0%\\r100%', file=sys.stderr)",
         [v4.new_output("stream", name="stderr", text="100%\n")]),
    ]
    nb = v4.new_notebook()
    nb.cells = [v4.new_code_cell(src, outputs=outs, execution_count=i + 1)
                for i, (src, outs) in enumerate(cells)]
    nbformat.write(nb, path)


def _failed_cells(path: Path, *options: str) -> tuple[list[int], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, str(path), "--nbval"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "passed" in done.stdout or "failed" in done.stdout, done.stdout + done.stderr
    return sorted({int(n) for n in re.findall(r"FAILED \S+::Cell (\d+)", done.stdout)}), done.stdout


def test_the_jupyterlab_pass_fails_on_stderr_a_stored_cell_lacks(tmp_path: Path) -> None:
    path = tmp_path / "fd.ipynb"
    _notebook(path)
    failed, out = _failed_cells(path, "-p", "tests.nbval_jupyterlab",
                                "--nbval-kernel-name", "lowvram-jupyterlab")
    assert failed == [1, 2, 3], out
    assert "stderr that the stored notebook does not show (JupyterLab would show it): " \
        "fd-level warning" in out
    assert "a C library speaks" in out  # nbval's own diff of the compared cell
    assert "UserWarning: new" in out


def test_nbval_alone_sees_none_of_it(tmp_path: Path) -> None:
    # why the pass exists: nbval's own kernel drops fd-level output, and ignored cells go unread
    path = tmp_path / "fd.ipynb"
    _notebook(path)
    failed, out = _failed_cells(path, "--nbval-current-env")
    assert failed == [], out

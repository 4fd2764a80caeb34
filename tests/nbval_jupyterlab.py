"""A pytest plugin for one strict nbval pass: each notebook's kernel started as JupyterLab starts
it, so that the pass also sees what a library writes straight to file descriptor 2.

nbval's kernel cannot see fd-level output such as torch's profiler lines: ipykernel forwards it
only when ``PYTEST_CURRENT_TEST`` is unset, and nbval starts its kernels from inside pytest.
JupyterLab does forward it, as a pink stderr box. With ``--nbval-kernel-name
lowvram-jupyterlab`` this plugin gives nbval a kernel spec of the current Python whose launcher
drops pytest's variables before ipykernel starts (fd capture is ipykernel's default). Then:

- in every cell nbval compares, the fd-level output is compared with the stored output as the
  rest is (the stored outputs are made without fd capture, so none is expected);
- in the cells nbval does not compare (``NBVAL_IGNORE_OUTPUT``: training logs), any stderr line
  that the stored cell does not show fails the cell: a new warning there would reach the
  learner's screen too.

So one nbval pass (``make test``'s AVX2 CPU) checks what a separate JupyterLab-like run of every
notebook checked before, without running every notebook once more. Use:
``pytest -p tests.nbval_jupyterlab --nbval --nbval-kernel-name lowvram-jupyterlab ...``
(from the repository root; not with ``--nbval-current-env``, which names nbval's own kernel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KERNEL_NAME = "lowvram-jupyterlab"

# Runs in the kernel's process before ipykernel: JupyterLab's kernels have no pytest variables.
_LAUNCHER = """\
import os
for name in [n for n in os.environ if n.startswith("PYTEST_")]:
    del os.environ[name]
from ipykernel import kernelapp
kernelapp.launch_new_instance()
"""

_fresh: list[list[Any]] = []  # the current cell's fresh outputs (nbval's first coalesce_streams)


def kernel_spec() -> dict[str, Any]:
    """The kernel spec: this Python, the launcher above, capture_fd_output on (said explicitly)."""
    return {
        "argv": [sys.executable, "-c", _LAUNCHER, "-f", "{connection_file}",
                 "--IPKernelApp.capture_fd_output=True"],
        "display_name": "Python 3 (as JupyterLab starts it)",
        "language": "python",
    }


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "nbval_kernel_name", None) != KERNEL_NAME:
        return
    import nbval.plugin

    # jupyter_client finds kernel specs under $JUPYTER_PATH/kernels/<name>/kernel.json
    root = Path(tempfile.mkdtemp(prefix="lowvram-kernels-"))
    (root / "kernels" / KERNEL_NAME).mkdir(parents=True)
    (root / "kernels" / KERNEL_NAME / "kernel.json").write_text(json.dumps(kernel_spec()))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(root), os.environ.get("JUPYTER_PATH", "")) if p)
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))  # after the kernels stop

    # nbval coalesces the fresh outputs first in each cell's runtest, whether or not it compares
    # them: keep that first result, the only way to see an ignored cell's outputs
    coalesce = nbval.plugin.coalesce_streams

    def keep_first(outputs: list[Any]) -> list[Any]:
        out = coalesce(outputs)
        if not _fresh:
            _fresh.append(out)
        return out

    nbval.plugin.coalesce_streams = keep_first
    config.add_cleanup(lambda: setattr(nbval.plugin, "coalesce_streams", coalesce))


def stderr_lines(outputs: list[Any], sanitize: Any = lambda s: s) -> list[str]:
    """The non-empty stderr lines of a cell's outputs, each progress-bar rewrite (``\\r``)
    reduced to its last state, sanitized as nbval sanitizes."""
    text = "".join(out.get("text", "") for out in outputs
                   if out.get("output_type") == "stream" and out.get("name") == "stderr")
    text = sanitize(re.sub(r"[^\n]*\r", "", text))
    return [line for line in text.splitlines() if line.strip()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _fresh.clear()
    outcome = yield
    options = getattr(item, "options", None)
    if (item.config.option.nbval_kernel_name != KERNEL_NAME or options is None
            or options.get("check") or outcome.excinfo is not None or not _fresh):
        return  # nbval compared this cell itself (or it failed already)
    stored = stderr_lines(item.cell.outputs, item.sanitize)
    extra = [line for line in stderr_lines(_fresh[0], item.sanitize) if line not in stored]
    if extra:
        outcome.force_exception(AssertionError(
            "stderr that the stored notebook does not show (JupyterLab would show it): "
            + " | ".join(extra[:3])))

"""The set-up the two commands rely on: dependency lists in step, JupyterLab serving the series."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = [r for r in pip_section if not r.startswith(("-", "--"))]
    # torch alone is pinned there: to the CI torch, whose CUDA build the extra index carries
    makefile = (ROOT / "Makefile").read_text()
    ci_torch = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M).group(1)
    assert ci_torch in pinned and any(r.startswith("torch>=") for r in wanted)
    pinned = [r for r in pinned if r != ci_torch]
    wanted = [r for r in wanted if not r.startswith("torch>=")]
    assert sorted(pinned) == sorted(wanted)  # same names and the same lower bounds
    assert "--extra-index-url https://download.pytorch.org/whl/cu130" in pip_section
    assert "-e ." in pip_section  # the project itself
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    low = re.search(r">=3\.(\d+)", project["requires-python"]).group(1)
    assert int(python.split("=")[1].split(".")[1]) >= int(low)


def test_constraints_pin_every_dependency_except_torch():
    pins = {
        _name(line): line.split("==")[1]
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = _name(req)
        if name == "torch":
            assert name not in pins  # torch follows TORCH_SPEC (CPU wheel in CI, CUDA for learners)
        else:
            assert name in pins, f"{name} is not pinned in constraints.txt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jupyterlab_serves_the_notebooks(tmp_path):
    port, token = _free_port(), "lowvram-test"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={ROOT / 'notebooks'}", "--ServerApp.port_retries=0",
    ] + (["--allow-root"] if os.geteuid() == 0 else [])  # CI runs as root  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/api/contents?token={token}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    listing = json.load(response)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
        served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        on_disk = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
        assert served == on_disk
        # the lab UI itself is served too
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
    finally:
        server.terminate()
        server.wait(timeout=30)

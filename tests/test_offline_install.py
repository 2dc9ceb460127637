"""The offline install in docs/operations.md works: a wheelhouse built with constraints.txt
installs into a fresh virtual environment with --no-index, and the installed tool runs.

Downloads from PyPI once (pip's cache makes later runs quick); skipped with a reason when
PyPI cannot be reached.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"


def pins(runtime_only: bool = False) -> dict[str, str]:
    """name -> version of every `name==version` line of constraints.txt (names canonical).

    runtime_only: only the lines before the first optional extra's section (a comment line
    "# The `NAME` extra ..."): what installing batchwbc alone must bring."""
    out = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if runtime_only and re.match(r"^# The `\w+` extra", line):
            break
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def _runtime_requirements() -> list[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].strip().splitlines() if r.strip()]
    return [re.split(r"[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in reqs if "python_version < \"3.11\"" not in r]


def test_constraints_pin_every_runtime_requirement_to_the_tested_version():
    from importlib.metadata import version

    p = pins()
    for name in _runtime_requirements():
        assert name in p, f"{name} is a runtime requirement but not pinned in constraints.txt"
    for name, pinned in p.items():  # the versions this environment (the one the tests run in) has
        assert version(name) == pinned, f"constraints.txt pins {name}=={pinned}, the tests run with {version(name)}"


def _pip(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _offline_env() -> dict:
    """No pip configuration at all: no index, no extra find-links, no global constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow
def test_offline_install_from_a_wheelhouse(tmp_path):
    probe = _pip(["download", "--no-deps", "--no-cache-dir", "-d", str(tmp_path / "probe"),
                  f"click=={pins()['click']}"], timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"PyPI is not reachable from here, so no wheelhouse can be built: {probe.stderr.strip()[-200:]}")

    # 1. On a connected machine: batchwbc's own wheel, then its dependencies at the pinned versions.
    src = tmp_path / "src"  # a copy, so building leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO / "batchwbc", src / "batchwbc", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    wheelhouse = tmp_path / "wheelhouse"
    built = _pip(["wheel", "--no-deps", "-w", str(wheelhouse), str(src)])
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheelhouse.glob("batchwbc-*.whl")
    got = _pip(["download", "-d", str(wheelhouse), "-c", str(CONSTRAINTS), str(wheel)])
    assert got.returncode == 0, got.stderr[-3000:]

    # 2. On the lab PC (no network): a fresh venv, only the wheelhouse.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
                           "-c", str(CONSTRAINTS), "batchwbc"], capture_output=True, text=True, timeout=900,
                          env=_offline_env())
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-3000:]

    frozen = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120,
                            env=_offline_env()).stdout
    installed = {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in re.findall(r"^([^=\s]+)==(\S+)$", frozen, re.M)}
    for name, version in pins(runtime_only=True).items():
        assert installed.get(name) == version, (name, installed.get(name), version)
    assert not {"hl7apy", "fhir-resources", "pydantic"} & set(installed)  # the [lis] extra stays optional

    # 3. The installed tool runs from outside the checkout, bundled model included.
    exe = venv / ("Scripts/batchwbc.exe" if sys.platform == "win32" else "bin/batchwbc")
    assert exe.is_file(), inst.stdout[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(exe), "run", str(REPO / "samples" / "slides"), "--out", str(tmp_path / "r.xlsx"),
                          "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    where = subprocess.run([str(py), "-c", "import batchwbc; print(batchwbc.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env).stdout
    assert str(venv) in where and (tmp_path / "r.xlsx").is_file()

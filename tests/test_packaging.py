"""The installed import names are modelbus's own: the wheel installs ``modelbus.events``,
``modelbus.services`` and ``modelbus.workers`` (from the card's top-level folders), so a distribution
named ``events`` from the registry installs beside it, and uninstalling that one leaves modelbus whole."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"events": "modelbus.events", "services": "modelbus.services", "workers": "modelbus.workers"}


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def test_every_package_folder_is_installed_under_the_modelbus_prefix() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {FOLDERS[init.relative_to(REPO).parts[0]] + "".join(f".{p}" for p in init.relative_to(REPO).parts[1:-1])
             for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == found
    assert setuptools["package-dir"] == {v: k for k, v in FOLDERS.items()}


@pytest.mark.slow
def test_the_wheel_installs_beside_the_registrys_events_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)
    wheel = next(wheels.glob("modelbus-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # the package data folders (the Makefile mutes setuptools' warnings about them): every shipped config,
    # the starter catalogue, the web page's templates and scripts
    data = {f"modelbus/services/{p.relative_to(REPO / 'services').as_posix()}"
            for pattern in ("configs/**/*", "catalog/*.yaml", "api/ui/templates/*.html", "api/ui/static/*")
            for p in (REPO / "services").glob(pattern) if p.is_file() and "__pycache__" not in p.parts}
    assert len(data) > 50 and "modelbus/services/api/ui/static/ui.js" in data
    assert data <= shipped, sorted(data - shipped)[:5]
    target = tmp_path / "env"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", wheel, "events==0.5")
    # modelbus's dependencies come from this test's environment, after the new environment's own packages
    site = next((target / "lib").glob("python3.*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz-deps.pth").write_text("\n".join(deps) + "\n")
    probe = ("import events, modelbus.events.errors as e; "
             "print(events.Events.__module__, e.ModelbusError.__module__, e.__file__)")
    out = _run(python, "-c", probe, cwd=tmp_path).split()
    assert out[:2] == ["events.events", "modelbus.events.errors"]
    assert "site-packages/modelbus/events/errors.py" in out[2]
    _run(python, "-m", "pip", "uninstall", "-q", "-y", "events")
    out = _run(python, "-c", "import modelbus.events.errors as e; print(e.Kind.NOT_FOUND)", cwd=tmp_path)
    assert out.strip() == "not_found"
    done = subprocess.run([python, "-c", "import events"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode != 0  # modelbus's own folder was never installed as `events`

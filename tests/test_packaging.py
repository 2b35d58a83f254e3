"""Packaging (pyproject.toml): the wheel holds every package (segmentation included), installs, and imports from where
it was installed; requires-python is the one place of the minimum Python version (the Makefile reads it)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("asi_core", "asi_hf", "classification", "segmentation")


def _can_build_offline() -> bool:
    """An offline build needs setuptools in this interpreter (--no-build-isolation) with its own bdist_wheel
    (setuptools >= 70.1) or the wheel package."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def _minimum_python() -> str:
    found = re.findall(r'^requires-python\s*=\s*">=\s*([0-9.]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert len(found) == 1, "pyproject.toml needs one requires-python = \">=X.Y\" line"
    return found[0]


def test_minimum_python_lives_in_pyproject_only():
    assert _minimum_python() == "3.11"
    makefile = (REPO / "Makefile").read_text()
    assert "requires-python" in makefile and "PY_MIN" in makefile
    assert "(3, 11)" not in makefile and "3.11" not in makefile  # read from pyproject.toml, not written twice


@pytest.mark.skipif(not _can_build_offline(), reason="needs setuptools (>= 70.1, or the wheel package) in this "
                                                     "interpreter to build the wheel offline")
def test_the_wheel_holds_every_package_and_imports_from_where_it_is_installed(tmp_path):
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the shared working tree
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_NO_INDEX"] = "1"  # offline: nothing is fetched
    subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for pkg in PACKAGES:
        expected = {str(p.relative_to(REPO)) for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
        assert expected and expected <= names, f"{pkg}: missing from the wheel: {sorted(expected - names)}"
    assert f"Requires-Python: >={_minimum_python()}" in metadata

    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path,
                   env=env, capture_output=True, text=True)
    code = ("import asi_core, asi_hf, classification.cli, segmentation.models\n"
            "from classification.registry import MODELS\n"
            "print(asi_core.__file__); print(asi_hf.__file__); print(classification.cli.__file__)\n"
            "print(segmentation.models.__file__)\n"
            "print('pspnet_r18' in MODELS and 'tinyllama' in MODELS)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    *files, registered = out.stdout.split()
    assert len(files) == 4 and registered == "True"
    for f in files:
        assert Path(f).resolve().is_relative_to(site.resolve()), f"{f} is not the installed copy under {site}"

    # the console entry point runs the command line from anywhere, configs given by path (issue 24)
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "asi-finetune = classification.cli:main" in entry_points
    script = site / "bin" / "asi-finetune"
    assert script.is_file()
    run = subprocess.run([sys.executable, str(script), "profile", "--config", str(REPO / "configs/models/mcunet.yaml"),
                          "--data.resolution", "32", "--data.batch_size", "2", "--trainer.logger", "false"],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"model": "mcunet"' in run.stdout.strip().splitlines()[-1]

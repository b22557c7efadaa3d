"""
A plain (non-editable) install ships the twistd plugin: the wheel holds
C{twisted/plugins/txlb_plugin.py} and nothing that would shadow Twisted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.support import ROOT, twistdCommand


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    [path] = out.glob("txlb-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/txlb_plugin.py" in names
    assert "twisted/plugins/txlb_schedulers.py" in names
    assert "txlb/tcp.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_copy_runs_under_twistd(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=600,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    run = lambda *args: subprocess.run(  # noqa: E731
        twistdCommand(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert "txlb" in run("--help").stdout
    check = run("-n", "txlb", "--config", str(ROOT / "config" / "demo.toml"), "--check")
    assert check.returncode == 0, check.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import txlb; print(txlb.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    assert imported.stdout.startswith(str(target))

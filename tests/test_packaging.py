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
    # Every layer's package, and the status page beside the admin API that serves it.
    for package in ("net", "balance", "observe", "control", "service", "http", "config", "health", "policy"):
        assert f"txlb/{package}/__init__.py" in names
    assert "txlb/control/status.html" in names
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


def test_wheel_carries_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n]


def _thirdPartyImports() -> set[str]:
    """Top-level names of every module txlb imports that is neither stdlib nor its own."""
    import ast

    found: set[str] = set()
    for path in [*(ROOT / "txlb").rglob("*.py"), *(ROOT / "twisted" / "plugins").glob("txlb*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "txlb"}


def test_every_imported_distribution_is_declared(wheel):
    """
    A module txlb imports comes from a distribution its metadata asks for
    (a requirement or an extra), so a plain C{pip install} never ends in an
    ImportError.
    """
    import re
    from importlib.metadata import packages_distributions

    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    ).decode()
    declared = {
        re.split(r"[\s;<>=!\[]", line.split(":", 1)[1].strip(), maxsplit=1)[0].lower().replace("_", "-")
        for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    }
    providers = packages_distributions()
    missing = {}
    for name in _thirdPartyImports():
        dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def _cleanTree(into) -> None:
    """
    What a fresh checkout has: the committed tree (C{git archive HEAD}),
    so a module that was never added to git is missed here as it would be
    by a user; outside a git checkout, the source without build leftovers.
    """
    import io
    import shutil
    import tarfile

    if (ROOT / ".git").exists():
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True,
                                 check=True, timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
        return
    shutil.copytree(ROOT, into, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache"))


def test_clean_checkout_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    """
    The whole way a user goes: a wheel from a clean copy of the tree,
    installed with its dependencies into a new virtualenv (nothing of the
    test environment's), whose C{twistd txlb} checks the demo config and
    says the version the metadata has.
    """
    source, out, venv = tmp_path / "source", tmp_path / "wheel", tmp_path / "venv"
    _cleanTree(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
                   check=True, timeout=300)
    [wheel] = out.glob("txlb-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    twistd = [str(venv / "bin" / "twistd")]
    run = lambda *args: subprocess.run(  # noqa: E731
        [*twistd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    check = run("-n", "txlb", "--check", "--config", str(source / "config" / "demo.toml"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "configuration is valid" in check.stdout
    metadata = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, txlb; print(m.version('txlb'), txlb.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    version, module = metadata
    assert module.startswith(str(venv))
    assert wheel.name.startswith(f"txlb-{version}-")
    shown = run("txlb", "--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"txlb {version}"

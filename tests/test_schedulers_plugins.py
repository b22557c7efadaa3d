"""
docs/plugins.md: the example plugin it shows is the file the integration
tests install, and the tests it shows pass.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.support import ROOT

DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "tests" / "plugin_example" / "twisted" / "plugins" / "txlb_failover.py"


def block(marker: str) -> str:
    """The fenced code block that follows C{<!-- marker -->} in the doc."""
    match = re.search(
        rf"<!-- {re.escape(marker)}[^>]*-->\n```python\n(.*?)```\n<!-- end of {re.escape(marker)} -->",
        DOC.read_text(),
        re.S,
    )
    assert match, f"no {marker!r} block in {DOC.name}"
    return match.group(1)


def loadExample():
    spec = importlib.util.spec_from_file_location("txlb_failover_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_shows_the_tested_plugin_verbatim():
    assert block("the example plugin") == EXAMPLE.read_text()


def test_example_plugin_has_no_package_markers():
    """twisted/ and twisted/plugins/ must stay namespace directories."""
    site = EXAMPLE.parent.parent.parent
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()


def _docTests():
    namespace = {"failover": loadExample().failover}
    exec(compile(block("the example tests"), str(DOC), "exec"), namespace)
    return sorted((name, f) for name, f in namespace.items() if name.startswith("test_"))


@pytest.mark.parametrize("name, test", _docTests(), ids=lambda v: v if isinstance(v, str) else "")
def test_doc_tests_pass(name, test):
    test()


def test_doc_tests_exist():
    assert len(_docTests()) == 3


def test_example_refuses_bad_options():
    from txlb.interfaces import SchedulerOptionsError

    failover = loadExample().failover
    with pytest.raises(SchedulerOptionsError, match="order must be a list"):
        failover({"order": "a,b"})
    with pytest.raises(SchedulerOptionsError, match="unknown option prefer"):
        failover({"prefer": ["a"]})

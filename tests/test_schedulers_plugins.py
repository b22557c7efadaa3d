"""
docs/plugins.md: the example plugin it shows is the file the integration
tests install, and the tests it shows pass.
"""

from __future__ import annotations

import pytest

from tests.support import ROOT, DocExample

EXAMPLE = DocExample(
    ROOT / "docs" / "plugins.md", ROOT / "tests" / "plugin_example" / "twisted" / "plugins" / "txlb_failover.py"
)


def test_doc_shows_the_tested_plugin_verbatim():
    EXAMPLE.checkShownVerbatim()


def test_example_plugin_has_no_package_markers():
    EXAMPLE.checkNamespaceDirectories()


@pytest.mark.parametrize("name, test", EXAMPLE.tests("failover"), ids=lambda v: v if isinstance(v, str) else "")
def test_doc_tests_pass(name, test):
    test()


def test_doc_tests_exist():
    assert len(EXAMPLE.tests("failover")) == 3


def test_example_refuses_bad_options():
    from txlb.interfaces import SchedulerOptionsError

    failover = EXAMPLE.load().failover
    with pytest.raises(SchedulerOptionsError, match="order must be a list"):
        failover({"order": "a,b"})
    with pytest.raises(SchedulerOptionsError, match="unknown option prefer"):
        failover({"prefer": ["a"]})

"""
The registry of algorithms: every built-in is a plugin, found by
twisted.plugin like a third party's, keeps the scheduler contract and
explains its decisions.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from zope.interface.verify import verifyObject

from tests.support import ROOT, sourceEnv
from txlb.balance.schedulers import BUILTINS, DEFAULT_ALGORITHM, schedulerFactories
from txlb.interfaces import IScheduler, ISchedulerFactory, SchedulerOptionsError
from txlb.testing import verifySchedulerFactory

SPEC_ALGORITHMS = {
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_response_time",
    "least_bandwidth",
    "ip_hash",
    "consistent_hash",
    "random",
    "power_of_two",
}


def test_every_algorithm_of_the_spec_is_built_in():
    assert {f.name for f in BUILTINS} == SPEC_ALGORITHMS
    assert set(schedulerFactories()) >= SPEC_ALGORITHMS


def test_default_is_power_of_two():
    assert DEFAULT_ALGORITHM == "power_of_two"
    assert DEFAULT_ALGORITHM in schedulerFactories()


@pytest.mark.parametrize("factory", BUILTINS, ids=lambda f: f.name)
def test_factories_and_schedulers_provide_their_interfaces(factory):
    assert verifyObject(ISchedulerFactory, factory)
    assert verifyObject(IScheduler, factory({}))
    assert factory.description


@pytest.mark.parametrize("factory", BUILTINS, ids=lambda f: f.name)
def test_contract(factory):
    verifySchedulerFactory(factory)


@pytest.mark.parametrize("factory", BUILTINS, ids=lambda f: f.name)
def test_unknown_options_are_refused_with_the_name(factory):
    with pytest.raises(SchedulerOptionsError, match=factory.name):
        factory({"bogus": 1})


def test_builtins_are_found_through_twisted_plugin():
    """
    In a fresh process with the source tree on the path, getPlugins finds
    every built-in through twisted/plugins/txlb_schedulers.py, the way it
    finds a third party's.
    """
    script = (
        "from twisted.plugin import getPlugins\n"
        "from twisted import plugins\n"
        "from txlb.interfaces import ISchedulerFactory\n"
        "print(' '.join(sorted(f.name for f in getPlugins(ISchedulerFactory, plugins))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=sourceEnv(),
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(out) >= SPEC_ALGORITHMS


def test_plugin_module_declares_exactly_the_builtins():
    """
    The plugin file names every built-in itself (twisted.plugin's cache
    only notices changes to that file).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "txlb_schedulers_plugin", ROOT / "twisted" / "plugins" / "txlb_schedulers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    declared = {
        value
        for value in vars(module).values()
        if ISchedulerFactory.providedBy(value) and not isinstance(value, type)
    }
    assert declared == set(BUILTINS)

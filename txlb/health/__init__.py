# -*- test-case-name: tests.test_health -*-
"""
Active health checks: which servers of a pool can take traffic.

    from txlb.health import HealthChecks, healthCheckFactories

    checks = HealthChecks(pool, poolConfig.health, endpoints, reactor,
                          healthCheckFactories())
    checks.setServiceParent(parent)

Kinds are found with L{twisted.plugin.getPlugins} against
L{IHealthCheckFactory}, the built-ins (C{http}, C{tcp}, C{grpc}) declared in
C{twisted/plugins/txlb_health.py} like any third party's and also listed
here, so that txlb works from a source tree whose plugin directory is not
on C{sys.path}.  C{none} is no factory: it means no checks.
"""

from __future__ import annotations

from typing import Mapping

from twisted.logger import Logger
from twisted.plugin import getPlugins

from txlb.health._checks import (
    MAX_BODY,
    HTTPCheck,
    HTTPCheckFactory,
    TCPCheck,
    TCPCheckFactory,
    httpCheck,
    tcpCheck,
)
from txlb.health._grpc import GRPCCheck, GRPCCheckFactory, grpcCheck
from txlb.health._machine import RiseFall
from txlb.health._service import JITTER, HealthChecks
from txlb.interfaces import CheckResult, IHealthCheck, IHealthCheckFactory

__all__ = [
    "BUILTINS",
    "JITTER",
    "MAX_BODY",
    "CheckResult",
    "GRPCCheck",
    "GRPCCheckFactory",
    "HTTPCheck",
    "HTTPCheckFactory",
    "HealthChecks",
    "IHealthCheck",
    "IHealthCheckFactory",
    "RiseFall",
    "TCPCheck",
    "TCPCheckFactory",
    "grpcCheck",
    "healthCheckFactories",
    "httpCheck",
    "tcpCheck",
]

_log = Logger()

BUILTINS: tuple[IHealthCheckFactory, ...] = (httpCheck, tcpCheck, grpcCheck)


def healthCheckFactories() -> Mapping[str, IHealthCheckFactory]:
    """
    Every health-check factory installed, by kind.  A plugin that reuses a
    built-in name (or C{none}) is ignored, with a warning.
    """
    found: dict[str, IHealthCheckFactory] = {f.name: f for f in BUILTINS}
    import twisted.plugins

    for factory in getPlugins(IHealthCheckFactory, twisted.plugins):
        existing = found.get(factory.name)
        if factory.name == "none" or (existing is not None and existing is not factory and existing != factory):
            _log.warn(
                "health check plugin {name!r} ignored: the name is taken",
                event="plugin_conflict",
                name=factory.name,
            )
        elif existing is None:
            found[factory.name] = factory
    return found

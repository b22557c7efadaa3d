# -*- test-case-name: tests.test_tap -*-
"""
C{twistd txlb}: command-line options and the service maker.

C{--check} validates the config, prints a short summary and exits 0 or 1,
like C{haproxy -c} and C{nginx -t}.  A config that does not validate stops
txlb here, one line per problem and no traceback, before anything listens.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import attrs
from twisted.python import usage

from txlb import __version__
from txlb.config import Config, ConfigError, describeProxy, describeTLS, describeTransforms, load
from txlb.config._admission import describeAdmission

DEFAULT_PATHS = ("txlb.toml", "/etc/txlb/txlb.toml")


class Options(usage.Options):
    synopsis = "[--config FILE] [--check]"
    longdesc = (
        "Run the txlb load balancer with the services of one TOML config file. "
        f"Without --config, {DEFAULT_PATHS[0]} then {DEFAULT_PATHS[1]} is read."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file."],
    ]
    optFlags = [
        ["check", None, "Validate the config, print a summary and exit 0 (valid) or 1."],
    ]

    def opt_version(self) -> None:
        """Print txlb's version and exit."""
        print(f"txlb {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["config"] is None:
            for path in DEFAULT_PATHS:
                if os.path.exists(path):
                    self["config"] = path
                    break
            else:
                raise usage.UsageError(
                    f"no --config given and neither {' nor '.join(DEFAULT_PATHS)} exists"
                )


def summary(config: Config) -> list[str]:
    """A few lines saying what the config will run."""
    lines = []
    if config.txlb.workers > 1:
        lines.append(f"{config.txlb.workers} worker processes")
    for s in config.services:
        line = f"service {s.name} ({s.protocol}) on {', '.join(s.listen)} -> pool {s.pool}"
        if s.protocol == "udp":
            line += f" (flows idle after {s.timeouts.idle:g}s, at most {s.limits.max_flows})"
        elif s.protocol == "http":
            line += (f" (HTTP/2 and HTTP/1.1, at most {s.limits.max_concurrent_streams} streams per connection)"
                     if s.http2 else " (HTTP/1.1 only: http2 = false)")
        lines.append(line)
        lines += [f"  {detail}" for detail in describeTransforms(s)]
        lines += [f"  {detail}" for detail in describeTLS(s)]
        lines += [f"  {detail}" for detail in describeProxy(s)]
        lines += [f"  {detail}" for detail in describeAdmission(s)]
    for p in config.pools.values():
        servers = ", ".join(f"{s.name}={s.address}" for s in p.servers) or "no servers"
        lines.append(f"pool {p.name} ({p.algorithm}, {_speaks(p)}): {servers}")
    if config.demo:
        lines.append("demo backends: " + ", ".join(f"{d.name} on {d.listen}" for d in config.demo))
    return lines


def _speaks(pool) -> str:
    """
    What HTTP services speak to a pool's servers: C{h1} or C{h2}, and over
    TLS or not (TCP services pass bytes through whatever it says).
    """
    protocol = "h2" if pool.protocol == "h2" else "h1"
    if pool.tls is None:
        return protocol
    return f"{protocol} over TLS" + ("" if pool.tls.verify else ", certificates not verified")


def logPath(configured: str, parent) -> str:
    """
    Where events go: C{[log] path}, unless it is C{-} (standard output)
    and twistd's standard output is no place for them.  A daemon's
    standard output is C{/dev/null}, so a daemonized txlb writes to
    twistd's C{--logfile}, or to C{twistd.log} as twistd itself would; an
    explicit C{--logfile} is honoured in the foreground too.  C{parent}
    is twistd's own options (C{None} outside twistd).
    """
    if configured != "-" or parent is None:
        return configured
    logfile = parent.get("logfile") or ""
    if logfile and logfile != "-":
        return os.path.abspath(logfile)
    if not logfile and not parent.get("nodaemon"):
        return os.path.abspath("twistd.log")
    return "-"


def readConfig(path: str, factories, healthFactories, err: TextIO) -> Config:
    """
    Load and validate, or print the problems and exit 1.
    """
    try:
        return load(path, factories, healthFactories)
    except ConfigError as e:
        for line in e.lines():
            print(line, file=err)
        n = len(e.problems)
        print(f"{path}: {n} problem{'s' if n != 1 else ''}; txlb not started", file=err)
        raise SystemExit(1)


def makeService(options: Options, out: TextIO = None, err: TextIO = None):
    out = out or sys.stdout
    err = err or sys.stderr
    from txlb.balance.schedulers import schedulerFactories
    from txlb.health import healthCheckFactories

    factories = schedulerFactories()
    healthFactories = healthCheckFactories()
    config = readConfig(options["config"], factories, healthFactories, err)
    if options["check"]:
        print(f"{options['config']}: configuration is valid", file=out)
        for line in summary(config):
            print(f"  {line}", file=out)
        raise SystemExit(0)

    from twisted.internet import reactor

    from txlb.service import TxlbService

    from txlb.observe.logs import makeObserver

    # More than one worker: this process is the master (txlb.service.workers).
    role = "master" if config.txlb.workers > 1 else "single"
    path = logPath(config.log.path, getattr(options, "parent", None))
    observer = makeObserver(attrs.evolve(config.log, path=path), clock=reactor)
    return TxlbService(config, factories, reactor, healthFactories, signals=True, role=role, logObserver=observer)

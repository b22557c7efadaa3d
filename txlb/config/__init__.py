# -*- test-case-name: tests.test_config -*-
"""
The config file: TOML in, validated and frozen objects out.

L{load} and L{parse} report every problem at once, as
C{FILE:LINE: key.path: what is wrong}, through L{ConfigError}.  The records
live in L{txlb.config._model}, the table reader and value converters in
L{txlb.config._table}, and one reader per section in L{txlb.config._read}.
"""

from txlb.config._model import (
    AcceptProxyConfig,
    AdminConfig,
    Algorithms,
    BackendTLSConfig,
    CacheConfig,
    CertificateConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DemoServer,
    DNSConfig,
    HealthConfig,
    Limits,
    LogConfig,
    PassiveConfig,
    PoolConfig,
    Problem,
    ProcessConfig,
    RouteConfig,
    ServerConfig,
    ServiceConfig,
    SessionsConfig,
    StickyConfig,
    Timeouts,
    TLSConfig,
)
from txlb.config._proxy import describeProxy
from txlb.config._read import load, parse
from txlb.config._rules import CompressConfig, HeaderOps, HeaderRules, RedirectConfig
from txlb.config._table import PLANNED, parseDuration, parseSize
from txlb.config._tls import describeTLS
from txlb.config._transform import describeTransforms

__all__ = [
    "AcceptProxyConfig", "AdminConfig", "Algorithms", "BackendTLSConfig", "CacheConfig", "CertificateConfig",
    "ClusterConfig", "Config",
    "ConfigError", "DemoServer", "DNSConfig", "HealthConfig", "Limits", "LogConfig", "PassiveConfig",
    "PoolConfig", "Problem", "ProcessConfig", "RouteConfig", "ServerConfig", "ServiceConfig",
    "SessionsConfig", "StickyConfig", "Timeouts", "TLSConfig", "PLANNED", "load", "parse",
    "parseDuration", "parseSize", "describeProxy", "describeTLS",
    "CompressConfig", "HeaderOps", "HeaderRules", "RedirectConfig", "describeTransforms",
]

"""
C{twistd txlb} as an operator meets it: help, C{--check}, bad configs, a
port that is taken.  These run twistd in a subprocess, as a user would.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, freePort, sourceEnv, twistdCommand


def twistd(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        twistdCommand(*args), cwd=cwd, env=sourceEnv(), capture_output=True, text=True, timeout=timeout
    )


def test_twistd_lists_txlb():
    result = twistd("--help")
    assert "txlb" in result.stdout


def test_help_documents_config_and_check():
    result = twistd("txlb", "--help")
    assert result.returncode == 0
    assert "--config" in result.stdout and "--check" in result.stdout


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "config").glob("*.toml")))
def test_every_shipped_config_passes_check(path):
    result = twistd("-n", "txlb", "--config", f"config/{path}", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration is valid" in result.stdout


def test_two_mistakes_are_both_named_without_a_traceback(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        "[pools.api]\n"
        'algorithm = "round_robin"\n'
        "servers = [\n"
        '  { name = "a", address = "127.0.0.1:9001" },\n'
        '  { name = "b", address = "not an address" },\n'
        "]\n"
        "[[services]]\n"
        'name = "web"\n'
        'listen = "tcp:8080"\n'
        'pool = "apii"\n'
    )
    result = twistd("-n", "txlb", "--config", str(config), "--check")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{config}:5: pools.api.servers[1].address:") for line in lines), lines
    assert any(
        line.startswith(f"{config}:10: services[0].pool:") and "did you mean 'api'" in line
        for line in lines
    ), lines


def test_bad_config_never_listens(tmp_path):
    port = freePort()
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[pools.p]\nservers = []\nbogus = 1\n[[services]]\nname = "s"\n'
        f'listen = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
    )
    result = twistd("-n", "--pidfile=", "txlb", "--config", str(config))
    assert result.returncode == 1
    assert "pools.p.bogus: unknown key" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_missing_config_file_is_one_clear_line(tmp_path):
    result = twistd("-n", "txlb", "--config", str(tmp_path / "nope.toml"), "--check")
    assert result.returncode == 1
    assert "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_stops_txlb_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "txlb.toml"
        config.write_text(
            f'[pools.p]\nservers = [{{ name = "a", address = "127.0.0.1:1" }}]\n'
            f'[[services]]\nname = "s"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
        )
        result = twistd("-n", "--pidfile=", "txlb", "--config", str(config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"service s: cannot listen on 'tcp:{port}:interface=127.0.0.1'" in output
    assert "Traceback" not in output


def test_default_config_path_is_txlb_toml_in_the_working_directory(tmp_path):
    (tmp_path / "txlb.toml").write_text("[log]\naccess = false\n")
    result = twistd("-n", "txlb", "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "txlb.toml: configuration is valid" in result.stdout


def test_check_summarises_udp_services():
    from txlb.config import parse
    from txlb.tap import summary

    config = parse(
        '[pools.r]\nservers = [{ name = "r1", address = "127.0.0.1:5301" }]\n'
        '[[services]]\nname = "dns"\nprotocol = "udp"\nlisten = "udp:5353"\npool = "r"\n'
        'timeouts = { idle = "5s" }\nlimits = { max_flows = 300 }\n'
    )
    assert summary(config)[0] == "service dns (udp) on udp:5353 -> pool r (flows idle after 5s, at most 300)"


def test_check_summary_says_what_each_pool_speaks_to_its_servers(tmp_path):
    import trustme

    from txlb.config import parse
    from txlb.tap import summary

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    config = parse(
        '[pools.web]\nservers = [{ name = "w1", address = "127.0.0.1:8001" }]\n'
        '[pools.grpc]\nprotocol = "h2"\nservers = [{ name = "g1", address = "127.0.0.1:50051" }]\n'
        f'[pools.secure]\nprotocol = "h2"\ntls = {{ ca = "{ca}" }}\n'
        'servers = [{ name = "s1", address = "127.0.0.1:50052" }]\n'
        '[pools.lax]\ntls = { verify = false }\nservers = [{ name = "l1", address = "127.0.0.1:8443" }]\n'
    )
    assert [line.split(":")[0] for line in summary(config)] == [
        "pool web (power_of_two, h1)",
        "pool grpc (power_of_two, h2)",
        "pool secure (power_of_two, h2 over TLS)",
        "pool lax (power_of_two, h1 over TLS, certificates not verified)",
    ]


def test_check_refuses_a_tcp_service_on_an_h2_pool(tmp_path):
    config = tmp_path / "txlb.toml"
    config.write_text(
        '[pools.grpc]\nprotocol = "h2"\nservers = [{ name = "g1", address = "127.0.0.1:50051" }]\n'
        '[[services]]\nname = "raw"\nprotocol = "tcp"\nlisten = "tcp:7000"\npool = "grpc"\n'
    )
    result = twistd("-n", "txlb", "--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 1
    assert f"{config}:8: services[0].pool: pool 'grpc' has protocol = \"h2\"" in result.stderr
    assert "a TCP service passes the client's bytes through" in result.stderr

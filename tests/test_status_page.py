"""
The status page at C{/}, rendered by a real browser: headless Chromium
against C{twistd txlb} with two services and two pools.  Skipped when no
Chromium is installed (C{./run-tests} installs Debian's C{chromium}).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from html.parser import HTMLParser
from typing import Optional

import pytest

from tests.support import Txlb, UDPBackend, connect, freePort, freeUDPPort, poolToml, recvLine, tcpServiceToml
from tests.test_admin import get, httpBackend
from tests.support import Backend

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def browse(url: str, profile, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on C{url}, after giving the page's script time to poll."""
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=5000",
            *extra, url,
        ],
        capture_output=True, text=True, timeout=120,
    )


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.buttons: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "button" and "data-action" in a:
            self.buttons.append((a["data-action"], a["data-pool"], a["data-server"]))

    def handle_data(self, data) -> None:
        self.text.append(data)


@pytest.fixture
def lb(tmp_path):
    web = [httpBackend("web-1"), httpBackend("web-2")]
    db = [Backend("db-1")]
    webPort, dbPort, admin = freePort(), freePort(), freePort()
    config = (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        + poolToml("frontends", web, "least_connections")
        + poolToml("databases", db)
        + f'[[services]]\nname = "shop"\nprotocol = "http"\nlisten = "tcp:{webPort}:interface=127.0.0.1"\npool = "frontends"\n'
        + tcpServiceToml("postgres", dbPort, "databases")
    )
    txlb = Txlb(config, tmp_path).start(listening=3)
    yield txlb, webPort, dbPort, admin
    txlb.stop()
    for b in web + db:
        b.stop()


def test_page_is_self_contained_html(lb):
    txlb, webPort, dbPort, admin = lb
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        page = response.read().decode()
    assert "<canvas" in page and "/api/stats" in page
    # Nothing from elsewhere: no external script, style, font or image.
    assert "http://" not in page and "https://" not in page and "src=" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (./run-tests installs it)")
def test_chromium_renders_every_service_pool_and_server(lb, tmp_path):
    txlb, webPort, dbPort, admin = lb
    for _ in range(6):
        get(webPort)
    with connect(dbPort) as sock:
        assert recvLine(sock) == b"db-1\n"

    result = browse(f"http://127.0.0.1:{admin}/", tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _Text()
    dom.feed(result.stdout)
    text = " ".join(dom.text)
    for name in ("shop", "postgres", "frontends", "databases", "web-1", "web-2", "db-1"):
        assert name in text, f"{name} is not on the page"
    assert "least_connections" in text and "round_robin" in text
    assert "updated " in text, "the page never got an answer from the API"
    # No token is configured: the drain buttons are there.
    assert ("drain", "frontends", "web-1") in dom.buttons
    assert ("drain", "databases", "db-1") in dom.buttons


class _UDPRows(HTMLParser):
    """The cells of each UDP service's server rows, by server name."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._row: Optional[list[str]] = None
        self._cell: Optional[list[str]] = None

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "udp-server":
            self._row = self.rows[a["data-name"]] = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag) -> None:
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (./run-tests installs it)")
def test_chromium_shows_a_udp_services_flows_datagrams_and_bytes_by_server(tmp_path):
    backends = [UDPBackend("dns-1"), UDPBackend("dns-2")]
    port, admin = freeUDPPort(), freePort()
    config = (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        + poolToml("resolvers", backends)
        + f'[[services]]\nname = "dns"\nprotocol = "udp"\nlisten = "udp:{port}:interface=127.0.0.1"\n'
        f'pool = "resolvers"\n'
    )
    txlb = Txlb(config, tmp_path).start(listening=2)
    clients = []
    try:
        for count in (2, 1):  # round robin: the first flow to dns-1, the second to dns-2
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
            clients.append(sock)
            for _ in range(count):
                sock.sendto(b"query", ("127.0.0.1", port))
                assert sock.recvfrom(65535)[0].endswith(b":query")

        result = browse(f"http://127.0.0.1:{admin}/", tmp_path / "profile", "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        dom = _Text()
        dom.feed(result.stdout)
        text = " ".join(dom.text)
        assert "updated " in text, "the page never got an answer from the API"
        assert "dns" in text and "udp" in text
        assert "2 flows" in " ".join(text.split()), "the service's live flows"
        rows = _UDPRows()
        rows.feed(result.stdout)
        # server, flows, datagrams in / out, bytes in / out ("dns-1:" is added to each answer), datagrams/s
        assert rows.rows["dns-1"][:4] == ["dns-1", "1", "2 / 2", "10 B / 22 B"]
        assert rows.rows["dns-2"][:4] == ["dns-2", "1", "1 / 1", "5 B / 11 B"]
    finally:
        for sock in clients:
            sock.close()
        txlb.stop()
        for b in backends:
            b.stop()

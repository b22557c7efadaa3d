"""
The status page at C{/}, rendered by a real browser: headless Chromium
against C{twistd txlb} with two services and two pools.  Skipped when no
Chromium is installed (C{./run-tests} installs Debian's C{chromium}).
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser

import pytest

from tests.support import Txlb, connect, freePort, poolToml, recvLine, tcpServiceToml
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

"""Issue 10: daphne with DEBUG off and the production defaults, as the image runs it
(`daphne --proxy-headers` behind a TLS-terminating Ingress, after `collectstatic`), serves the
dashboard's CSS and htmx, sends browsers to HTTPS and leaves machine clients on plain HTTP.

One web process for the module, with no database: nothing here reads one.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port

HOST = "poolsadmin.example.com"
# What the Ingress adds in front of TLS; daphne reads the scheme only along with the address.
HTTPS = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Web:
    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers={"Host": HOST, **(headers or {})})
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection.close()


def assets(web: Web) -> _Assets:
    """The asset URLs of the login page, fetched as a browser through the Ingress."""
    page = web.get("/login/", HTTPS)
    assert page.status == 200, page.body[:2000]
    found = _Assets()
    found.feed(page.body.decode())
    return found


class _Assets(HTMLParser):
    """The stylesheet and script URLs of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.stylesheets: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "link" and found.get("rel") == "stylesheet" and found.get("href"):
            self.stylesheets.append(str(found["href"]))
        if tag == "script" and found.get("src"):
            self.scripts.append(str(found["src"]))


@contextlib.contextmanager
def daphne(var: Path, **env: str) -> Iterator[Web]:
    """daphne as the image starts it, with this environment over a database-less default."""
    port = free_port()
    environment = {
        **os.environ,
        "ALLOWED_HOSTS": HOST,
        "POOLSADMIN_VAR_DIR": str(var),
        "DATABASE_URL": "",
        "CHANNEL_LAYER_URL": "",
        **env,
    }
    for name in ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"):
        environment.pop(name, None)  # the defaults, whatever this shell has
    with (var / "web.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "--proxy-headers", "-b", "127.0.0.1", "-p",
             str(port), "poolsadmin.asgi:application"],
            env=environment, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            server = Web(port)
            deadline = time.monotonic() + 60
            while True:
                try:
                    server.get("/metrics")
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError((var / "web.log").read_text()) from None
                    time.sleep(0.2)
            yield server
        finally:
            process.terminate()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def web(collected_static: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """DEBUG off, after collectstatic: production."""
    var = tmp_path_factory.mktemp("production-var")
    secret = secrets.token_urlsafe(50)
    with daphne(var, DEBUG="false", SECRET_KEY=secret, STATIC_ROOT=str(collected_static)) as web:
        yield web


def stylesheet_and_htmx(web: Web) -> tuple[Answer, Answer]:
    """What the login page links, fetched as a browser would through the Ingress."""
    page = assets(web)
    [css] = page.stylesheets
    [htmx] = [src for src in page.scripts if "django_htmx/htmx" in src]
    return web.get(css, HTTPS), web.get(htmx, HTTPS)


def assert_css_and_javascript(stylesheet: Answer, script: Answer) -> None:
    assert stylesheet.status == 200
    assert stylesheet.headers["Content-Type"].startswith("text/css")
    assert b"{" in stylesheet.body
    assert script.status == 200
    assert script.headers["Content-Type"].split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }
    assert b"htmx" in script.body


def test_the_login_page_links_the_css_and_htmx_that_daphne_serves_with_debug_off(
    web: Web,
) -> None:
    [css] = assets(web).stylesheets

    stylesheet, script = stylesheet_and_htmx(web)

    assert_css_and_javascript(stylesheet, script)
    # Hashed names from the manifest: a new release never meets an old file in a cache.
    assert css.startswith("/static/css/app.") and css.count(".") == 2
    assert "immutable" in stylesheet.headers["Cache-Control"]


def test_with_debug_on_daphne_serves_them_from_the_source_tree_without_collectstatic(
    tmp_path: Path,
) -> None:
    """`make demo` and a developer's daphne: nothing collected, files as they are edited."""
    with daphne(tmp_path, DEBUG="true", STATIC_ROOT=str(tmp_path / "never-collected")) as web:
        [css] = assets(web).stylesheets
        stylesheet, script = stylesheet_and_htmx(web)

    assert css == "/static/css/app.css"
    assert_css_and_javascript(stylesheet, script)


def test_static_files_are_sent_compressed_to_a_client_that_accepts_it(web: Web) -> None:
    [css] = assets(web).stylesheets

    answer = web.get(css, {**HTTPS, "Accept-Encoding": "gzip"})

    assert answer.status == 200
    assert answer.headers["Content-Encoding"] == "gzip"


def test_a_browser_on_plain_http_is_sent_to_https(web: Web) -> None:
    answer = web.get("/login/")

    assert answer.status == 301
    assert answer.headers["Location"] == f"https://{HOST}/login/"


def test_over_https_the_page_has_hsts_and_its_csrf_cookie_is_secure(web: Web) -> None:
    answer = web.get("/login/", HTTPS)

    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    [cookie] = answer.headers.get_all("Set-Cookie") or []
    assert cookie.startswith("csrftoken=")
    assert "Secure" in cookie.split("; ")


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/metrics", "/api/v1/agents/heartbeat", "/api/v1/pools"]
)
def test_machine_clients_on_plain_http_are_not_redirected(web: Web, path: str) -> None:
    """The kubelet, agents, Prometheus and scripts reach the Service inside the cluster."""
    assert web.get(path).status != 301

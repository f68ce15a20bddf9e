"""HTTP under daphne: Django's WSGI handler in a pool of threads (lib/http_app.py), driven here
over ASGI as daphne drives it. tests/e2e/test_production_serving.py does it through daphne."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from twisted.web import http as twisted_http

from poolsadmin.health.middleware import PROBES
from poolsadmin.lib.http_app import (
    PROBE_THREADS,
    HttpAdmission,
    Threads,
    WsgiInThreads,
    http_application,
    idle,
)
from poolsadmin.pools.services import pool_token_create
from tests.ledger import ADMIN, make_agent_with_secret, make_pool
from tests.processes import ROOT

PATIENCE_SECONDS = 30


def _request(
    app: Any, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        + [(b"host", b"testserver"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }

    async def exchange() -> tuple[int, dict[str, str], bytes]:
        talk = ApplicationCommunicator(app, scope)
        await talk.send_input({"type": "http.request", "body": body, "more_body": False})
        start = await talk.receive_output(PATIENCE_SECONDS)
        content = b""
        while True:
            message = await talk.receive_output(PATIENCE_SECONDS)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        sent = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return start["status"], sent, content

    return async_to_sync(exchange)()


@pytest.fixture(scope="module")
def app() -> Any:
    return http_application(exempt=PROBES)


def test_a_probe_is_answered(app: Any) -> None:
    status, _, content = _request(app, "GET", "/healthz")

    assert status == 200
    assert json.loads(content) == {"status": "ok"}


def test_a_static_file_is_served_by_whitenoise(settings: Any, collected_static: Path) -> None:
    # The test run has DEBUG off (pytest-django), so WhiteNoise serves STATIC_ROOT, as in
    # production, from the files it finds there when the application starts.
    settings.STATIC_ROOT = collected_static

    status, headers, content = _request(
        http_application(exempt=PROBES), "GET", "/static/css/app.css"
    )

    assert status == 200
    assert headers["content-type"].startswith("text/css")
    assert len(content) == int(headers["content-length"]) > 0


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_is_answered_on_a_thread_of_the_pool(app: Any) -> None:
    pool = make_pool(name="p1")
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    registration = make_agent_with_secret(pool, "P1")
    seen: list[str] = []
    original = app.app.app  # Django, inside a2wsgi, inside admission

    def recording(environ: Any, start_response: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(environ, start_response)

    app.app.app = recording
    try:
        status, headers, content = _request(
            app,
            "POST",
            f"/api/v1/agents/{registration.agent.agent_id}/heartbeat",
            body=json.dumps({"running_task_ids": []}).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token}",
                "X-Agent-Secret": registration.secret,
            },
        )
    finally:
        app.app.app = original

    assert status == 200, content
    assert headers["content-type"] == "application/json"
    assert json.loads(content) == {"assignments": [], "cancellations": []}
    assert seen and seen[0].startswith("http-")  # a kept thread of the pool, not one per request


def test_the_pool_has_threads_for_requests_and_for_waiting_heartbeats(settings: Any) -> None:
    settings.HTTP_THREADS = 7
    settings.LONG_POLLS_MAX = 5

    # and a few for the probes, which are answered even when every place is taken
    assert http_application(exempt=PROBES).app.threads.most == 7 + 5 + PROBE_THREADS


def test_twisted_parses_each_content_type_once_with_the_same_result(app: Any) -> None:
    parse: Any = twisted_http._parseContentType
    original = parse.__wrapped__  # the function of Twisted that the application wrapped

    for line in [b"application/json", b"text/plain; charset=utf-8", b"Multipart/Form-Data; b=1"]:
        assert parse(line) == original(line)
    hits = parse.cache_info().hits
    parse(b"application/json")
    assert parse.cache_info().hits == hits + 1


# Admission, with a WSGI application of the test's own: it records how many requests are in
# it at once and holds each until the test lets it go.


class _Held:
    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.lock = threading.Lock()
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        self.entered.release()
        try:
            if environ["PATH_INFO"] == "/idle":
                with idle():  # as a waiting heartbeat does
                    assert self.go.wait(PATIENCE_SECONDS)
            elif environ["PATH_INFO"] != "/healthz":
                assert self.go.wait(PATIENCE_SECONDS)
        finally:
            with self.lock:
                self.inside -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]


def _admitted(held: _Held, places: int) -> HttpAdmission:
    return HttpAdmission(WsgiInThreads(held, 10), places=places, exempt=PROBES)


async def _get(app: Any, path: str) -> int:
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "query_string": b"", "root_path": "", "headers": [],
             "server": ("testserver", 80)}  # fmt: skip
    talk = ApplicationCommunicator(app, scope)
    await talk.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await talk.receive_output(PATIENCE_SECONDS)
    # The whole body, to its last message: one left unread is still being sent when the
    # test's event loop closes ("coroutine 'Queue.put' was never awaited").
    while (await talk.receive_output(PATIENCE_SECONDS)).get("more_body"):
        pass
    return int(start["status"])


async def _entered(held: _Held, count: int) -> None:
    for _ in range(count):
        assert await asyncio.to_thread(held.entered.acquire, True, PATIENCE_SECONDS)


def test_at_most_http_threads_requests_work_at_once() -> None:
    held = _Held()
    app = _admitted(held, places=2)

    async def scenario() -> list[int]:
        requests = [asyncio.ensure_future(_get(app, f"/{n}")) for n in range(5)]
        await _entered(held, 2)
        await asyncio.sleep(0.2)  # time for a third to get in, if admission let it
        assert held.inside == 2
        held.go.set()
        return await asyncio.gather(*requests)

    assert async_to_sync(scenario)() == [200] * 5
    assert held.most == 2


def test_a_waiting_request_gives_its_place_to_one_that_works() -> None:
    held = _Held()
    app = _admitted(held, places=1)

    async def scenario() -> list[int]:
        waiting = asyncio.ensure_future(_get(app, "/idle"))
        await _entered(held, 1)
        working = asyncio.ensure_future(_get(app, "/work"))
        await _entered(held, 1)  # in, while the first holds no place: it would wait otherwise
        held.go.set()
        return list(await asyncio.gather(waiting, working))

    assert async_to_sync(scenario)() == [200, 200]


def test_a_probe_is_answered_while_every_place_is_taken() -> None:
    held = _Held()
    app = _admitted(held, places=1)

    async def scenario() -> int:
        working = asyncio.ensure_future(_get(app, "/work"))
        await _entered(held, 1)
        status = await _get(app, "/healthz")
        held.go.set()
        await working
        return status

    assert async_to_sync(scenario)() == 200


def test_idle_outside_a_request_does_nothing() -> None:
    with idle():
        pass


def test_the_threads_are_started_as_needed_and_kept() -> None:
    threads = Threads(most=3)
    names = [threads.submit(lambda: threading.current_thread().name).result() for _ in range(4)]

    assert names == ["http-1"] * 4  # one at a time: the one thread, kept
    assert threads.started == 1
    assert threads.submit(lambda n: n * 2, 21).result(PATIENCE_SECONDS) == 42
    with pytest.raises(ZeroDivisionError):
        threads.submit(lambda: 1 / 0).result(PATIENCE_SECONDS)


def test_no_more_threads_than_most_however_many_wait() -> None:
    threads = Threads(most=2)
    go = threading.Event()
    futures = [threads.submit(go.wait, PATIENCE_SECONDS) for _ in range(5)]

    assert threads.started == 2
    go.set()
    assert [f.result(PATIENCE_SECONDS) for f in futures] == [True] * 5


def test_a_thread_stuck_in_a_request_does_not_hold_the_process_exit(tmp_path: Path) -> None:
    """As when daphne stops while a response's last message waits for its event loop: with
    ThreadPoolExecutor the interpreter joins the thread at exit, forever (it happened in CI)."""
    script = (
        "import threading\n"
        "from poolsadmin.lib.http_app import Threads\n"
        "threads = Threads(most=1)\n"
        "threads.submit(threading.Event().wait)\n"
        "print('exiting', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=PATIENCE_SECONDS, cwd=ROOT
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == b"exiting\n"

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


def _scope(
    method: str, path: str, body_size: int, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
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
        + [(b"host", b"testserver"), (b"content-length", str(body_size).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def _whole(body: bytes) -> list[dict[str, Any]]:
    """A request's body in one message."""
    return [{"type": "http.request", "body": body, "more_body": False}]


async def _messages(
    app: Any, scope: dict[str, Any], inputs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every message the application sends for `inputs`, to the response's last: one left
    unread is still being sent when the test's event loop closes ("coroutine 'Queue.put' was
    never awaited")."""
    communicator = ApplicationCommunicator(app, scope)
    for message in inputs:
        await communicator.send_input(message)
    sent = [await communicator.receive_output(PATIENCE_SECONDS)]
    while True:
        sent.append(await communicator.receive_output(PATIENCE_SECONDS))
        if not sent[-1].get("more_body"):
            return sent


def _exchange(
    app: Any, scope: dict[str, Any], inputs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return async_to_sync(_messages)(app, scope, inputs)


def _request(
    app: Any, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    start, *rest = _exchange(app, _scope(method, path, len(body), headers), _whole(body))
    sent = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], sent, b"".join(m.get("body", b"") for m in rest)


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
    return int((await _messages(app, _scope("GET", path, 0), _whole(b"")))[0]["status"])


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


# The crossings between the event loop and a request's thread (WsgiInThreads), with WSGI
# applications of the test's own.


class _Echo:
    """Answers with the size of the body it read, its own thread's crossings to the event loop
    counted (a2wsgi crosses for each read and each message of the response)."""

    def __init__(self, *, answer_size: int = 0, chunk: int = 64 * 1024) -> None:
        self.answer_size = answer_size
        self.chunk = chunk
        self.calls = 0
        self.crossings = 0

    def __call__(self, environ: Any, start_response: Any) -> Any:
        self.calls += 1
        original = asyncio.run_coroutine_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.crossings += 1
            return original(*args, **kwargs)

        asyncio.run_coroutine_threadsafe = counted
        try:
            size = len(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"read ")  # WSGI's write callable, before the iterable's chunks
            yield f"{size}".encode()
            left = self.answer_size
            while left > 0:
                yield b"x" * min(self.chunk, left)
                left -= self.chunk
        finally:
            asyncio.run_coroutine_threadsafe = original


def test_a_small_request_crosses_to_its_thread_and_back_once() -> None:
    echo = _Echo()
    body = b"{}" * 100

    sent = _exchange(
        WsgiInThreads(echo, 2),
        _scope("POST", "/echo", len(body)),
        _whole(body),
    )

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert sent[1] == {"type": "http.response.body", "body": b"read 200", "more_body": False}
    assert echo.calls == 1
    assert echo.crossings == 0  # the body was read, and the answer sent, on the event loop


def test_a_body_sent_in_several_messages_is_read_whole() -> None:
    parts = [b"a" * 1000, b"b" * 1000, b"c" * 10]

    sent = _exchange(
        WsgiInThreads(_Echo(), 2),
        _scope("POST", "/echo", 2010),
        [{"type": "http.request", "body": p, "more_body": n < 2} for n, p in enumerate(parts)],
    )

    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"read 2010"


def test_a_body_larger_than_the_buffer_streams_to_the_thread(monkeypatch: Any) -> None:
    monkeypatch.setattr("poolsadmin.lib.http_app.BUFFERED_BYTES", 1000)
    parts = [b"a" * 800, b"b" * 800, b"c" * 800]

    echo = _Echo()

    sent = _exchange(
        WsgiInThreads(echo, 2),
        _scope("POST", "/echo", 2400),
        [{"type": "http.request", "body": p, "more_body": n < 2} for n, p in enumerate(parts)],
    )

    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert body == b"read 2400"
    assert echo.crossings >= 1  # the thread asked the event loop for the rest of the body


def test_an_answer_larger_than_the_buffer_is_sent_as_it_is_made(monkeypatch: Any) -> None:
    monkeypatch.setattr("poolsadmin.lib.http_app.BUFFERED_BYTES", 1000)
    echo = _Echo(answer_size=5000, chunk=700)

    sent = _exchange(
        WsgiInThreads(echo, 2),
        _scope("GET", "/big", 0),
        _whole(b""),
    )

    bodies = [m["body"] for m in sent[1:]]
    assert b"".join(bodies) == b"read 0" + b"x" * 5000
    assert len(bodies) > 2  # in parts, not held whole until the end
    assert all(len(part) <= 1000 + 700 for part in bodies)
    assert echo.crossings == len(bodies) - 1  # each part but the last crossed from the thread


def test_a_request_whose_client_left_before_its_body_ended_is_not_run() -> None:
    echo = _Echo()

    async def talk() -> bool:
        communicator = ApplicationCommunicator(WsgiInThreads(echo, 2), _scope("POST", "/x", 10))
        await communicator.send_input({"type": "http.request", "body": b"12345", "more_body": True})
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(PATIENCE_SECONDS)  # the application ends, having sent nothing
        return await communicator.receive_nothing()

    assert async_to_sync(talk)()
    assert echo.calls == 0


def test_an_error_of_the_application_reaches_the_server() -> None:
    def failing(environ: Any, start_response: Any) -> Any:
        raise RuntimeError("boom")

    async def talk() -> None:
        communicator = ApplicationCommunicator(WsgiInThreads(failing, 2), _scope("GET", "/", 0))
        await communicator.send_input(_whole(b"")[0])
        await communicator.wait(PATIENCE_SECONDS)  # raises what the application raised

    with pytest.raises(RuntimeError, match="boom"):  # daphne answers 500 and logs it
        async_to_sync(talk)()


class _Closing:
    """A WSGI response iterable that counts its close() (Django's request_finished, which
    hands the database connection back, runs in it)."""

    def __init__(self, chunks: list[bytes], *, fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = 0

    def __iter__(self) -> Any:
        for n, chunk in enumerate(self.chunks):
            if n == self.fail_after:
                raise RuntimeError("the disk went away")
            yield chunk

    def close(self) -> None:
        self.closed += 1


def test_the_response_is_closed_once() -> None:
    response = _Closing([b"a", b"b"])

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return response

    sent = _exchange(
        WsgiInThreads(app, 2),
        _scope("GET", "/", 0),
        _whole(b""),
    )

    assert sent[-1]["body"] == b"ab"
    assert response.closed == 1


def test_a_large_response_that_fails_half_way_is_ended_not_raised(
    monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Raised to daphne after the start went out, its 500 would find the response started
    # and stop daphne's application checker for the life of the process.
    monkeypatch.setattr("poolsadmin.lib.http_app.BUFFERED_BYTES", 1000)
    response = _Closing([b"x" * 800] * 5, fail_after=3)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return response

    sent = _exchange(
        WsgiInThreads(app, 2),
        _scope("GET", "/big", 0),
        _whole(b""),
    )

    assert sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert 0 < sum(len(m.get("body", b"")) for m in sent[1:]) < 4000
    assert response.closed == 1
    assert "a response failed after it started: /big" in caplog.text


def test_an_error_answer_replaces_what_was_written_before_anything_was_sent() -> None:
    def app(environ: Any, start_response: Any) -> Any:
        write = start_response("200 OK", [])
        write(b"half of an answer")
        try:
            raise ValueError("found late")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"sorry"]

    sent = _exchange(
        WsgiInThreads(app, 2),
        _scope("GET", "/", 0),
        _whole(b""),
    )

    assert sent[0]["status"] == 500
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"sorry"

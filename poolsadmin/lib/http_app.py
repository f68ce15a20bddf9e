"""HTTP under daphne: Django's WSGI handler, run in a pool of threads, with admission.

Django's ASGI handler serves a sync view by crossing from the event loop to a thread and back
at each sync/async boundary of the middleware chain, and it starts a new thread for every
request (and another to join it). For a heartbeat, whose view and four queries take about a
millisecond, that machinery was most of the ~6 ms of CPU it cost one daphne process (issue 9:
157 heartbeats/s at 94 % CPU, p95 over 6 s). Every view of poolsadmin is sync, so HTTP runs
Django's sync handler instead, whole, in a thread of a pool that is kept: one crossing per
request, the same middleware chain as the test client's (WsgiInThreads: the body is read
before the thread starts and the response sent after it ends). WebSockets stay on Channels.

Admission: at most HTTP_THREADS requests work at once; the others wait on the event loop, in
order, where waiting costs nothing (a thread per waiting request would be created for each,
and they would all contend for the interpreter and the database pool: 503s past its timeout).
A heartbeat that waits for work (agents/nudge.py) gives its place up while it waits (`idle`)
and takes one again to answer; such heartbeats are capped at LONG_POLLS_MAX (each holds a
thread), so the pool has HTTP_THREADS + LONG_POLLS_MAX threads, started only when needed, and
a few more for the probes, which skip admission: a busy process still answers /healthz.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi import build_environ
from a2wsgi.wsgi_typing import ExceptionInfo, WSGIApp
from django.conf import settings
from django.core.wsgi import get_wsgi_application

logger = logging.getLogger(__name__)

PROBE_THREADS = 4  # beyond the others, for the paths that skip admission
# A request body up to this size is read on the event loop before the request's thread starts,
# and a response up to this size is sent from the event loop after it ends (WsgiInThreads);
# larger ones stream, message by message, as a2wsgi streams them.
BUFFERED_BYTES = 1024 * 1024


def http_application(*, exempt: Iterable[str]) -> HttpAdmission:
    """The ASGI application for HTTP: Django's WSGI handler in a pool of threads, behind
    admission, which the paths of `exempt` (the health probes) skip."""
    _parse_content_type_once()
    # A Django response is iterable bytes, as WSGI asks; django-stubs types it otherwise.
    django_wsgi = cast(WSGIApp, get_wsgi_application())
    threads = settings.HTTP_THREADS + settings.LONG_POLLS_MAX + PROBE_THREADS
    return HttpAdmission(
        WsgiInThreads(django_wsgi, threads), places=settings.HTTP_THREADS, exempt=exempt
    )


class Threads(Executor):
    """Daemon threads, started as needed up to `most` and kept. Like ThreadPoolExecutor, but a
    process exits without joining them: a request whose thread waits on daphne's event loop
    when it stops (a response's last message, sent as SIGTERM arrives) would otherwise hold
    the exit forever (ThreadPoolExecutor joins its threads at interpreter exit)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.started = 0
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one per thread waiting for work
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._work.put((future, functools.partial(fn, *args, **kwargs)))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self.started < self.most:
                    self.started += 1
                    name = f"http-{self.started}"
                    threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            future, call = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as error:  # the future carries it to the caller
                    future.set_exception(error)
            del future, call
            self._idle.release()


class WsgiInThreads(WSGIMiddleware):
    """a2wsgi's WSGI-to-ASGI adapter on `Threads`, with one crossing each way for a request
    whose body and response fit in BUFFERED_BYTES (every request of the API and the pages).

    a2wsgi's thread crosses back to the event loop and waits there for each message: the
    body, the response's start, each chunk and its end, five round trips of a thread and the
    loop for a heartbeat. In a virtual machine each wake-up is a context switch that costs
    more than the interpreter's work around it (issue 9: about a third of the web process's
    CPU was the kernel switching tasks). Here the loop reads the body before the thread
    starts and sends the response after it ends; the thread only runs Django."""

    def __init__(self, app: WSGIApp, threads: int) -> None:
        # a2wsgi makes a ThreadPoolExecutor of its own, which starts no thread until it is
        # used (never); it calls only `submit` (run_in_executor), which Threads has.
        super().__init__(app, workers=1)
        self.threads = Threads(threads)
        self.executor = cast(ThreadPoolExecutor, self.threads)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = await _body_start(receive)
        if started is None:  # the client left before its request was whole: nothing to run
            return
        body, more = started
        if more:  # too big to hold: a2wsgi reads the rest as the thread asks for it
            await super().__call__(scope, _replay(body, receive), send)
            return
        loop = asyncio.get_running_loop()
        reply = _Reply(loop, send)
        environ = build_environ(scope, cast(Any, io.BytesIO(body)))
        call = functools.partial(contextvars.copy_context().run, reply.run, self.app, environ)
        try:
            await loop.run_in_executor(self.threads, call)
        except Exception:
            if not reply.started:
                raise  # nothing sent yet: daphne answers 500 and logs it
            # A large response failed half-way: end it here. Raised to daphne, whose error
            # answer would find the response started and stop its application checker.
            logger.exception("a response failed after it started: %s", scope.get("path"))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await reply.finish()


async def _body_start(receive: Any) -> tuple[bytes, bool] | None:
    """The request body's first BUFFERED_BYTES (all of it, as a rule), and whether more
    follows; None if the client went away first."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body), False
        if len(body) >= BUFFERED_BYTES:
            return bytes(body), True


def _replay(first: bytes, receive: Any) -> Any:
    """`receive` that gives `first` (read already) and then what is still to come."""
    replayed = False

    async def again() -> Any:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": first, "more_body": True}
        return await receive()

    return again


class _Reply:
    """A response collected on the request's thread and sent from the event loop when the
    thread ends; past BUFFERED_BYTES (a large static file) the thread hands what it has to
    the loop and waits for it to be sent, chunk by chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Any) -> None:
        self._loop = loop
        self._send = send
        self._start: dict[str, Any] | None = None
        self.started = False  # the start went to the client
        self._chunks: list[bytes] = []
        self._size = 0

    def run(self, app: WSGIApp, environ: Any) -> None:  # on the request's thread
        iterable = app(environ, self._start_response)
        try:
            for chunk in iterable:
                self._write(chunk)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExceptionInfo | None = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            if self.started:  # too late to answer otherwise (PEP 3333)
                raise exc_info[1].with_traceback(exc_info[2])
            self._chunks, self._size = [], 0  # the error's answer replaces what was written
        self._start = {
            "type": "http.response.start",
            "status": int(status.split(" ", 1)[0]),
            "headers": [
                (name.strip().encode("latin1").lower(), value.strip().encode("latin1"))
                for name, value in headers
            ],
        }
        return self._write

    def _write(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(chunk)
            self._size += len(chunk)
        if self._size > BUFFERED_BYTES:
            asyncio.run_coroutine_threadsafe(self._flush(more=True), self._loop).result()

    async def _flush(self, *, more: bool) -> None:
        if not self.started:
            if self._start is None:
                raise RuntimeError("the WSGI application wrote before start_response")
            self.started = True
            await self._send(self._start)
        body, self._chunks, self._size = b"".join(self._chunks), [], 0
        if body or not more:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def finish(self) -> None:  # on the event loop, once the thread has ended
        await self._flush(more=False)


class _Place:
    """A request's place among the HTTP_THREADS that work: taken on the event loop before its
    thread starts, given back when it ends, and given up and taken again around a wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop, places: asyncio.Semaphore) -> None:
        self._loop = loop
        self._places = places
        self._lock = threading.Lock()
        self._held = True
        self._ended = False

    def give_up(self) -> None:  # on the request's thread
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._loop.call_soon_threadsafe(self._places.release)

    def take_again(self) -> None:  # on the request's thread; waits for a place
        asyncio.run_coroutine_threadsafe(self._places.acquire(), self._loop).result()
        with self._lock:
            if not self._ended:
                self._held = True
                return
        # The request ended meanwhile (its client went away): the place is not its any more.
        self._loop.call_soon_threadsafe(self._places.release)

    def end(self) -> None:  # on the event loop
        with self._lock:
            self._ended = True
            held, self._held = self._held, False
        if held:
            self._places.release()


_place: contextvars.ContextVar[_Place | None] = contextvars.ContextVar("http_place", default=None)


class HttpAdmission:
    """ASGI middleware: at most `places` requests inside `app` at once (those of `exempt`
    paths aside); the request's thread sees its place (WsgiInThreads runs it in a copy of the
    request's context)."""

    def __init__(self, app: WsgiInThreads, *, places: int, exempt: Iterable[str]) -> None:
        self.app = app
        self.places = places
        self.exempt = frozenset(exempt)
        # One per event loop (daphne has one; a test may run several, one after another).
        self._semaphores: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Semaphore
        ] = weakref.WeakKeyDictionary()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        places = self._semaphores.get(loop)
        if places is None:
            places = self._semaphores[loop] = asyncio.Semaphore(self.places)
        await places.acquire()
        place = _Place(loop, places)
        token = _place.set(place)
        try:
            await self.app(scope, receive, send)
        finally:
            _place.reset(token)
            place.end()


@contextmanager
def idle() -> Iterator[None]:
    """While the block runs (a heartbeat waiting for work), the current request's place goes to
    a request that works; it takes a place again, waiting if need be, when the block ends.
    Outside a request of the HTTP application (tests, the worker): nothing."""
    place = _place.get()
    if place is None:
        yield
        return
    place.give_up()
    try:
        yield
    finally:
        place.take_again()


def _parse_content_type_once() -> None:
    """daphne's HTTP (twisted.web) parses every request's Content-Type header through the
    email package, whatever the type, to see whether it is a form it should decode: about 15 %
    of the web process's CPU when 1,000 agents heartbeat (the same "application/json" each
    time). The parse is a pure function of the header's bytes, so it is kept for the few
    values clients send (bounded: an odd client cannot grow it). A Twisted without that
    function is left as it is (tests/lib/test_http_app.py says when it went)."""
    from twisted.web import http

    parse = getattr(http, "_parseContentType", None)
    if parse is None or hasattr(parse, "cache_info"):
        return
    http._parseContentType = functools.lru_cache(maxsize=64)(parse)

"""HTTP under daphne: Django's WSGI handler, run in a pool of threads (a2wsgi), with admission.

Django's ASGI handler serves a sync view by crossing from the event loop to a thread and back
at each sync/async boundary of the middleware chain, and it starts a new thread for every
request (and another to join it). For a heartbeat, whose view and four queries take about a
millisecond, that machinery was most of the ~6 ms of CPU it cost one daphne process (issue 9:
157 heartbeats/s at 94 % CPU, p95 over 6 s). Every view of poolsadmin is sync, so HTTP runs
Django's sync handler instead, whole, in a thread of a pool that is kept: one crossing per
request, the same middleware chain as the test client's. WebSockets stay on Channels.

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
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi_typing import WSGIApp
from django.conf import settings
from django.core.wsgi import get_wsgi_application

PROBE_THREADS = 4  # beyond the others, for the paths that skip admission


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
    """a2wsgi's WSGI-to-ASGI adapter on `Threads`."""

    def __init__(self, app: WSGIApp, threads: int) -> None:
        # a2wsgi makes a ThreadPoolExecutor of its own, which starts no thread until it is
        # used (never); it calls only `submit` (run_in_executor), which Threads has.
        super().__init__(app, workers=1)
        self.threads = Threads(threads)
        self.executor = cast(ThreadPoolExecutor, self.threads)


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
    paths aside); the request's thread sees its place (a2wsgi runs it in a copy of the
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

"""The one source of "now", so tests can move time without sleeping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.utils import timezone

_lock = threading.Lock()
_offset = timedelta(0)
_frozen: datetime | None = None


def now() -> datetime:
    with _lock:
        if _frozen is not None:
            return _frozen
        return timezone.now() + _offset


def advance(seconds: float) -> None:
    """Move the clock forward (tests only)."""
    global _offset, _frozen
    with _lock:
        if _frozen is not None:
            _frozen += timedelta(seconds=seconds)
        else:
            _offset += timedelta(seconds=seconds)


def reset() -> None:
    global _offset, _frozen
    with _lock:
        _offset = timedelta(0)
        _frozen = None


@contextmanager
def frozen_at(moment: datetime) -> Iterator[None]:
    global _frozen
    with _lock:
        previous = _frozen
        _frozen = moment
    try:
        yield
    finally:
        with _lock:
            _frozen = previous

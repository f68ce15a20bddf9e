"""Whether htmx sent a request (django-htmx's `HtmxMiddleware` sets `request.htmx`)."""

from __future__ import annotations

from django.http import HttpRequest


def is_htmx(request: HttpRequest) -> bool:
    """True when htmx sent the request; a request that skipped the middleware is not."""
    return bool(getattr(request, "htmx", False))

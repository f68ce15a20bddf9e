"""Whether htmx asks for a fragment (django-htmx's `HtmxMiddleware` sets `request.htmx`)."""

from __future__ import annotations

from django.http import HttpRequest


def is_htmx(request: HttpRequest) -> bool:
    """True when htmx sent the request and wants the fragment. A history restore (Back to a
    page whose URL a filter pushed, not in htmx's cache) needs the whole page, and a request
    that skipped the middleware is not htmx."""
    details = getattr(request, "htmx", None)
    if details is None or not details:
        return False
    return not details.history_restore_request

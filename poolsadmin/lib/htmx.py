"""Whether htmx asks for a fragment (django-htmx's `HtmxMiddleware` sets `request.htmx`)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.cache import patch_vary_headers


def is_htmx(request: HttpRequest) -> bool:
    """True when htmx sent the request and wants the fragment. A history restore (Back to a
    page whose URL a filter pushed, not in htmx's cache) needs the whole page, and a request
    that skipped the middleware is not htmx."""
    details = getattr(request, "htmx", None)
    if details is None or not details:
        return False
    return not details.history_restore_request


def page_or_partial(request: HttpRequest, template: str, partial: str) -> str:
    """The page's template, or for htmx (a poll, a filter, a refresh) its swappable partial
    (`template#partial`, django-template-partials)."""
    return f"{template}#{partial}" if is_htmx(request) else template


class VaryOnHtmxMiddleware:
    """`Vary: HX-Request` on every answer. Pages answer htmx with a fragment at their own URL
    (a poll, a filter, a dialog): without it a browser's HTTP cache could hand the fragment
    back for a normal load of that URL (Back, restore), a page without its layout."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        patch_vary_headers(response, ("HX-Request",))
        return response

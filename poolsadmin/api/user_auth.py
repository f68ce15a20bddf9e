"""Who may call the admin JSON API: a logged-in session user, or a person's bearer token
(`Authorization: Bearer pat_...`), and with which permission.

CSRF: the views are `csrf_exempt` for the middleware and check CSRF themselves, only for
session requests (as DRF's SessionAuthentication does). A browser attaches the session cookie
to a forged cross-site POST but never an Authorization header, so a bearer request cannot be
forged that way and needs no CSRF token, while a session POST still does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from poolsadmin.api.http import error_response, method_not_allowed
from poolsadmin.api.services import api_token_authenticate
from poolsadmin.lib.errors import Unauthenticated

View = Callable[..., HttpResponse]

# Marks views that went through `api_user`, so `api_route` can refuse to route (and thereby
# csrf-exempt) a view that checks neither authentication nor CSRF.
_CHECKED = "_api_user_checked"


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request: HttpRequest, reason: str) -> Any:
        return reason  # the reason, not Django's HTML 403 page


def _csrf_failure(request: HttpRequest) -> str | None:
    check = _CsrfCheck(lambda request: HttpResponse())
    check.process_request(request)
    # callback=None: the view itself is csrf_exempt, which would skip the check.
    reason = check.process_view(request, None, (), {})  # type: ignore[arg-type]
    return reason if isinstance(reason, str) else None


def _unauthenticated(detail: str) -> HttpResponse:
    response = error_response(Unauthenticated(detail))
    response["WWW-Authenticate"] = 'Bearer realm="poolsadmin"'
    return response


def _authenticate(request: HttpRequest) -> HttpResponse | None:
    """Set `request.user` from the bearer token or keep the session user; a response if the
    request may not go on."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return _unauthenticated("Authorization must be 'Bearer pat_<64 hex>'")
        try:
            request.user = api_token_authenticate(secret=secret.strip())
        except Unauthenticated as error:
            return _unauthenticated(error.message)
        return None
    if not request.user.is_authenticated:
        return _unauthenticated("log in, or send Authorization: Bearer pat_<64 hex>")
    reason = _csrf_failure(request)
    if reason is not None:
        return JsonResponse(
            {
                "error": "csrf_failed",
                "detail": f"CSRF check failed: {reason}. Send the X-CSRFToken header with a "
                "session, or use a bearer token.",
            },
            status=403,
        )
    return None


def permission_denied(request: HttpRequest, perm: str) -> JsonResponse:
    """403 naming the permission the user lacks (also for a check inside a view)."""
    return JsonResponse(
        {
            "error": "forbidden",
            "detail": f"{request.user.get_username()} lacks the permission {perm}",
            "permission": perm,
        },
        status=403,
    )


def api_user(perm: str | None) -> Callable[[View], View]:
    """Require a session user or a bearer token, and `perm` if given (403 naming it)."""

    def decorator(view: View) -> View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            refused = _authenticate(request)
            if refused is not None:
                return refused
            if perm is not None and not request.user.has_perm(perm):
                return permission_denied(request, perm)
            return view(request, *args, **kwargs)

        setattr(wrapper, _CHECKED, True)
        return csrf_exempt(wrapper)

    return decorator


def api_route(**handlers: View) -> View:
    """One URL, one view per HTTP method (`api_route(GET=..., POST=...)`); any other method
    gets a JSON 405 naming the allowed ones."""
    for method, handler in handlers.items():
        if not getattr(handler, _CHECKED, False):
            raise TypeError(f"{method} handler {handler.__name__} is not wrapped in api_user")

    def route(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        handler = handlers.get(request.method or "")
        if handler is None:
            return method_not_allowed(request, handlers)
        return handler(request, *args, **kwargs)

    return csrf_exempt(route)

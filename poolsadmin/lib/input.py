"""What every text a client sends must be before any code looks it up or stores it: free of
NUL bytes (PostgreSQL text cannot hold one: the query fails with DataError) and valid Unicode
(a lone surrogate cannot be encoded as UTF-8: the driver, hashing and templates fail).

Checked at the edge, once, before any view code runs: `InputCheckMiddleware` for what the
URL, the query string and forms carry, `api.http.json_body` for JSON bodies (strings and keys
at any depth), `api.agent_auth.request_agent` for the agent headers. Refusals are 400s that
name the field (the URL kwarg, query parameter, form field or JSON key), so the client knows
what to fix, and nothing has been read or written by then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.shortcuts import render

from poolsadmin.lib.errors import InvalidInput
from poolsadmin.lib.htmx import is_htmx

# Answers under this prefix are JSON (`{"error", "detail", "field"}`), as the APIs' own.
API_PREFIX = "/api/"
BAD_INPUT_TEMPLATE = "bad_input.html"


def answers_json(request: HttpRequest) -> bool:
    """Whether an answer poolsadmin makes for this request outside its views (a refusal, a
    503) is the APIs' JSON rather than a page."""
    return request.path_info.startswith(API_PREFIX)


def text_problem(value: str) -> str | None:
    """What is wrong with `value` as text, or None."""
    if "\x00" in value:
        return "contains a NUL byte"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (it contains a lone surrogate)"
    return None


def shown(name: str) -> str:
    """A field name fit for a message: a hostile name (a JSON key with a NUL byte) escaped."""
    return name if text_problem(name) is None else ascii(name)


def check_text(value: str, *, field: str) -> None:
    """Refuse `value` with a 400 naming `field` unless it is clean text."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidInput(f"{shown(field)} {problem}", field=field)


def _check_params(params: QueryDict) -> None:
    for name, values in params.lists():
        check_text(name, field=name)
        for value in values:
            check_text(value, field=name)


class InputCheckMiddleware:
    """Refuse a request whose URL kwargs, query parameters or form fields are not clean text,
    before its view runs: with the APIs' JSON error under /api/, else with a page (or, for
    htmx, the action dialog's content) naming the field.

    Forms are checked only for views that CSRF protects (the dashboard, login, the Django
    admin), as CsrfViewMiddleware reads them: the APIs are csrf_exempt and read JSON, which
    json_body checks, and reading a multipart body here would take it from them."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponse | None:
        try:
            for name, value in view_kwargs.items():
                if isinstance(value, str):
                    check_text(value, field=name)
            _check_params(request.GET)
            if not getattr(view_func, "csrf_exempt", False):
                _check_params(request.POST)
        except InvalidInput as error:
            return bad_input_response(request, error)
        return None


def bad_input_response(request: HttpRequest, error: InvalidInput) -> HttpResponse:
    """The 400 naming the field: JSON under /api/, else the bad-input page (its partial in
    the action dialog for htmx). Also for a view that finds a parameter wrong."""
    if answers_json(request):
        return JsonResponse(error.as_dict(), status=error.http_status)
    in_dialog = is_htmx(request)
    template = f"{BAD_INPUT_TEMPLATE}#bad-input" if in_dialog else BAD_INPUT_TEMPLATE
    context = {
        "detail": error.message,
        "field": shown(error.field or ""),
        "in_dialog": in_dialog,
    }
    return render(request, template, context, status=error.http_status)

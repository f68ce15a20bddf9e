"""JSON plumbing shared by the agent API and the admin API: body parsing with field-named
400s, and one mapping from domain errors to HTTP statuses."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from poolsadmin.lib.errors import DomainError, InvalidInput, NotFound
from poolsadmin.lib.input import check_text

Handler = TypeVar("Handler", bound=Callable[..., HttpResponse])

# No endpoint takes more than a list inside the object (an agent's running_task_ids); deeper
# nesting is refused before anything walks it, and far deeper nesting (json's recursion
# limit) is refused by the parser.
MAX_JSON_DEPTH = 8


def json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object, or InvalidInput naming what is wrong: the body (not JSON,
    not an object, too large, too deeply nested) or the top-level key under which a string or
    key is not clean text (`lib.input`)."""
    try:
        raw = request.body
    except RequestDataTooBig:
        raise InvalidInput("body is larger than the server accepts", field="body") from None
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidInput(_TOO_DEEP, field="body") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object", field="body")
    for key, value in data.items():
        check_text(key, field=key)
        _check_json(value, field=key, depth=1)
    return data


_TOO_DEEP = f"body is nested deeper than {MAX_JSON_DEPTH} levels"


def _check_json(value: Any, *, field: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(_TOO_DEEP, field="body")
    if isinstance(value, str):
        check_text(value, field=field)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, field=field, depth=depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, field=field)
            _check_json(item, field=field, depth=depth + 1)


def field_str(data: dict[str, Any], name: str, *, required: bool = True, default: str = "") -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required", field=name)
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    return value


def field_bool(data: dict[str, Any], name: str, *, default: bool = False) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false", field=name)
    return value


def field_int(data: dict[str, Any], name: str, *, required: bool = True, default: int = 0) -> int:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required", field=name)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer", field=name)
    return value


def field_number(data: dict[str, Any], name: str, *, low: float, high: float) -> float | None:
    """A number between `low` and `high`, or None. Comparing first refuses NaN and Infinity
    (which json accepts) and an integer too large for a float, before float() overflows."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be a number from {low:g} to {high:g}", field=name)
    return float(value)


def error_response(error: DomainError) -> JsonResponse:
    return JsonResponse(error.as_dict(), status=error.http_status)


def json_errors(view: Handler) -> Handler:
    """Turn domain errors raised by a view into JSON error responses."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except DomainError as error:
            return error_response(error)

    return wrapper  # type: ignore[return-value]


def method_not_allowed(request: HttpRequest, allowed: Iterable[str]) -> JsonResponse:
    """405 naming the methods that are allowed (in the body and in `Allow`)."""
    allow = ", ".join(sorted(allowed))
    response = JsonResponse(
        {
            "error": "method_not_allowed",
            "detail": f"{request.method} is not allowed here; use {allow}",
        },
        status=405,
    )
    response["Allow"] = allow
    return response


def allow_methods(*methods: str) -> Callable[[Handler], Handler]:
    """Only `methods`; any other gets a JSON 405 naming them. The view is csrf_exempt: its
    callers authenticate with headers, never a cookie, so there is nothing to forge, and
    CsrfViewMiddleware would otherwise answer a wrong-method POST with its HTML 403 first."""

    def decorator(view: Handler) -> Handler:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return method_not_allowed(request, methods)
            return view(request, *args, **kwargs)

        return csrf_exempt(wrapper)  # type: ignore[return-value]

    return decorator


def not_found(request: HttpRequest) -> JsonResponse:
    """Any URL under /api/v1/ that no endpoint has: a JSON 404, as the API's own are."""
    return error_response(NotFound(f"no API endpoint at {request.path}"))

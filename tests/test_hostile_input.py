"""Hostile input against every endpoint (issue 8): the agent API, the admin API and every
dashboard URL (its POST actions and its pages), sent with credentials that get a request past
authentication, so that what is exercised is the parsing: hostile URL parts, query strings,
JSON bodies (nested, huge numbers, NaN, NUL bytes, lone surrogates, empty keys, wrong types,
long strings), forms and methods.

Whatever comes in: no 5xx; under /api/ every 4xx is JSON with `error` and `detail`, a 405 says
`Allow`; every 400 names the field (the API's `field`, the dashboard's `data-field`).

The endpoints come from walking the URL resolver, so a new one is fuzzed without a change
here; one whose URL has a kwarg that no value is known for fails
test_every_endpoint_can_be_fuzzed until the `world` fixture has one. Deterministic for CI
(`derandomize`, no example database), and bounded: 25 requests per endpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from poolsadmin.events.models import Event
from poolsadmin.pools.models import Slot
from poolsadmin.pools.services import pool_token_create
from tests.ledger import (
    ADMIN,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    submit,
)

pytestmark = pytest.mark.django_db

# --- the endpoints: every URL pattern of the project ------------------------------------------

# Django's own admin is Django's to harden; everything else is ours.
NOT_OURS = ("django-admin/",)


@dataclass(frozen=True)
class Endpoint:
    route: str  # "api/v1/pools/<str:pool_id>/pause"
    kwargs: tuple[tuple[str, str], ...]  # (name, converter): ("pool_id", "str")

    @property
    def api(self) -> bool:
        return self.route.startswith("api/")

    @property
    def agent(self) -> bool:
        return self.route.startswith("api/v1/agents/")

    def __str__(self) -> str:
        return "/" + self.route


def _converter_name(converter: Any) -> str:
    return type(converter).__name__.removesuffix("Converter").lower()  # IntConverter -> int


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[Endpoint]:
    for entry in patterns:
        route = prefix + str(entry.pattern)
        if route.startswith(NOT_OURS):
            continue
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, route)
        elif isinstance(entry, URLPattern):
            converters = dict(getattr(entry.pattern, "converters", {}))
            yield Endpoint(
                route=route,
                kwargs=tuple((name, _converter_name(c)) for name, c in converters.items()),
            )


ENDPOINTS = sorted(set(_walk(get_resolver().url_patterns)), key=str)


# --- the world the requests act on -------------------------------------------------------------


@dataclass
class World:
    values: dict[str, list[str]]  # URL kwarg -> ids that exist
    agent_headers: dict[str, str]  # pool token, X-Agent-Id, X-Agent-Secret
    admin_headers: dict[str, str]  # a personal API token of the admin persona
    session: str  # the admin persona's session cookie


@pytest.fixture
def world(admin: User, admin_token: str, worker_cluster: Any) -> World:
    """A static pool with an agent, its pod and a reserved slot (a plan_and_apply waiting for
    its confirmation, a plan in the queue), and a k8s pool on the fake cluster."""
    pool = make_pool(name="blue", slots_per_pod=2)
    k8s = make_pool(name="kube", pool_type="k8s", pod_image="img", max_replicas=3)
    registration = make_agent_with_secret(pool, "P1")
    workspace = make_workspace(pool, "infra")
    planned = plan_with_changes(submit(workspace, "plan_and_apply"))
    pending = submit(workspace, "plan")
    slot = Slot.objects.get(task_id=planned.pk)
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    session = Client()
    session.force_login(admin)
    return World(
        values={
            "pool_id": [pool.pool_id, k8s.pool_id],
            "agent_id": [registration.agent.agent_id],
            "task_id": [str(planned.pk), str(pending.pk)],
            "slot_id": [str(slot.pk)],
            "pod_id": [str(pod_of(registration.agent).pk)],
            "event_id": [str(Event.objects.order_by("-id").values_list("id", flat=True)[0])],
            "workspace_id": [workspace.workspace_id],
        },
        agent_headers={
            "Authorization": f"Bearer {token}",
            "X-Agent-Id": registration.agent.agent_id,
            "X-Agent-Secret": registration.secret,
        },
        admin_headers={"Authorization": f"Bearer {admin_token}"},
        session=session.cookies[settings.SESSION_COOKIE_NAME].value,
    )


# --- hostile values ------------------------------------------------------------------------------

SNIPPETS = [
    "\x00",
    "\ud800",
    "\udfff",
    "²",
    "٣",
    "%00",
    "/",
    "..",
    "#",
    "?",
    "'\"<>&",
    "\n",
    "\u202e",
    " ",
    "-1",
    "0",
    "9" * 30,
    "NaN",
    "pool-",
    "ws-",
]
# Values the parsers want, so that some requests get past the first check to the next one.
PLAUSIBLE = [
    "maintenance",
    "plan",
    "plan_and_apply",
    "k8s",
    "static",
    "running",
    "success",
    "apply_pending",
    "applied",
    "2030-01-01T00:00:00Z",
    "9999-12-31T23:59:59-05:00",
    "9999-12-31T23:59:59Z",
    "on",
    "1",
    "60",
]
# Every field a view reads from a body, a form or a query string, and some it does not.
FIELDS = [
    "name",
    "version",
    "agent_id",
    "status",
    "stage",
    "error_message",
    "running_task_ids",
    "cpu",
    "memory",
    "pool_id",
    "pool_type",
    "description",
    "pod_image",
    "namespace",
    "slots_per_pod",
    "plan_and_apply_per_pod",
    "min_replicas",
    "max_replicas",
    "workspace_id",
    "execution_mode",
    "task_type",
    "reason",
    "force",
    "expected_version",
    "dry_run",
    "until",
    "pods",
    "minutes",
    "next",
    "actor",
    "kind",
    "pool",
    "task",
    "workspace",
    "page",
    "agent",
    "q",
    "username",
    "password",
    "",
]

texts = st.one_of(
    st.lists(st.sampled_from(SNIPPETS), min_size=1, max_size=3).map("".join),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
    st.integers(0, 300).map(lambda n: "x" * n),  # past every column's max_length
    st.sampled_from(PLAUSIBLE),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
keys = st.one_of(st.sampled_from(FIELDS), texts)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)


def _nested(depth: int) -> str:
    return '{"cpu": ' + "[" * depth + "]" * depth + "}"


raw_json_bodies = st.one_of(
    st.integers(1, 100_000).map(_nested),
    st.sampled_from(
        [b"", b"{nope", b"[]", b'"x"', b"\xff\xfe", b'{"name": "\xed\xa0\x80"}', b"1" * 5000]
    ),
)
# Mostly the fields views read (an endpoint refuses a field it does not know, so a body of
# random keys rarely gets further), then any keys, then bodies that are not such an object.
plausible = st.sampled_from(PLAUSIBLE) | st.integers(0, 3) | st.booleans()
json_objects = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), plausible | plausible | json_values, max_size=3),
    st.dictionaries(keys, json_values, max_size=5),
)


def _encode(text: str) -> str:
    """Percent-encoded as a client would send it; a lone surrogate as the bytes of its UTF-8
    look-alike (which Django decodes to U+FFFD or leaves percent-encoded)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _form(params: dict[str, str]) -> str:
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in params.items())


form_bodies = st.dictionaries(keys, texts | numbers.map(str), max_size=5).map(_form)
# Half the requests have no query: a hostile one is refused before the body is read.
queries = st.just("") | st.dictionaries(keys, texts, min_size=1, max_size=3).map(_form)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: str | bytes
    content_type: str
    headers: dict[str, str]


def _path(endpoint: Endpoint, values: dict[str, str]) -> str:
    path = "/" + endpoint.route
    for name, value in values.items():
        path = re.sub(rf"<(\w+:)?{name}>", _encode(value), path)
    return path


@pytest.fixture
def allowed(world: World, endpoint: Endpoint) -> list[str]:
    """The methods the endpoint takes, as its answer to OPTIONS says (`Allow`: its 405, or a
    class-based view's own answer), so most requests use one and reach the parsers."""
    path = _path(endpoint, {name: world.values[name][0] for name, _ in endpoint.kwargs})
    response = _send(Request("OPTIONS", path, "", "text/plain", {}), world)
    allow = [method.strip() for method in response.get("Allow", "").split(",")]
    return [method for method in allow if method in METHODS] or METHODS


def _draw_request(
    data: st.DataObject, endpoint: Endpoint, world: World, allowed: list[str]
) -> Request:
    values = {}
    for name, converter in endpoint.kwargs:
        hostile = st.integers(0, 10**30).map(str) if converter == "int" else texts
        valid = st.sampled_from(world.values[name])
        values[name] = data.draw(st.one_of(valid, valid, valid, hostile), label=name)
    path = _path(endpoint, values)
    query = data.draw(queries, label="query")
    if query:
        path += "?" + query
    right = st.sampled_from(allowed)
    method = data.draw(st.one_of(right, right, right, st.sampled_from(METHODS)), label="method")
    if endpoint.api:
        body: str | bytes
        if data.draw(st.integers(0, 5), label="not an object") == 0:
            body = data.draw(raw_json_bodies, label="raw body")
        else:
            obj = data.draw(json_objects, label="body")
            if endpoint.agent and data.draw(st.booleans(), label="names the agent"):
                # accept and status name the agent in the body: get past that to the rest.
                obj["agent_id"] = world.values["agent_id"][0]
            body = json.dumps(obj, allow_nan=True)
        content_type = "application/json"
        headers = dict(world.agent_headers if endpoint.agent else world.admin_headers)
        if endpoint.agent and data.draw(st.integers(0, 4), label="hostile agent id") == 0:
            # What a WSGI/ASGI server can deliver: latin-1 text, NUL bytes included.
            headers["X-Agent-Id"] = data.draw(texts).encode("latin-1", "replace").decode("latin-1")
    else:
        body = data.draw(form_bodies, label="form")
        content_type = "application/x-www-form-urlencoded"
        headers = {"HX-Request": "true"} if data.draw(st.booleans(), label="htmx") else {}
    return Request(method, path, body, content_type, headers)


def _send(request: Request, world: World) -> Any:
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = world.session
    return client.generic(
        request.method,
        request.path,
        request.body,
        request.content_type,
        headers=request.headers,
    )


def _check(endpoint: Endpoint, response: Any) -> None:
    status = response.status_code
    assert status < 500
    if endpoint.api:
        if 400 <= status < 500:
            assert response["Content-Type"] == "application/json"
            body = json.loads(response.content)
            assert isinstance(body["error"], str) and isinstance(body["detail"], str)
            if status == 400:
                assert "field" in body, body
            if status == 405:
                assert response["Allow"]
    elif status == 400:
        assert re.search(rb'data-field="[^"]*"', response.content), response.content[:2000]


# --- the properties ------------------------------------------------------------------------------


def test_every_endpoint_can_be_fuzzed(world: World) -> None:
    """The walk found the APIs and the dashboard's actions, and every URL kwarg has values."""
    routes = {endpoint.route for endpoint in ENDPOINTS}
    assert "api/v1/agents/<str:agent_id>/heartbeat" in routes
    assert "api/v1/pools/<str:pool_id>/hold" in routes
    assert "pools/<str:pool_id>/hold/" in routes
    unknown = {
        f"{endpoint}: {name}"
        for endpoint in ENDPOINTS
        for name, _ in endpoint.kwargs
        if name not in world.values
    }
    assert not unknown, f"no values to fuzz these URL kwargs with; add them to world: {unknown}"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    # The world is built once per endpoint; each example runs in a savepoint rolled back
    # after it, so examples cannot see each other's writes.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_input_is_never_a_5xx_and_every_400_names_the_field(
    world: World, endpoint: Endpoint, allowed: list[str], data: st.DataObject
) -> None:
    request = _draw_request(data, endpoint, world, allowed)
    savepoint = transaction.savepoint()
    try:
        response = _send(request, world)
    finally:
        transaction.savepoint_rollback(savepoint)
    _check(endpoint, response)

"""A fake Kubernetes API server: the pod endpoints poolsadmin's adapter uses, over real HTTP.

SPEC 10: tests run the official client through `poolsadmin.kube.adapter` against this server,
so the client's own request building, serialisation and error handling are exercised. It
implements exactly:

    GET    /api/v1/namespaces/<ns>/pods?labelSelector=a=b,c!=d   (equality-based selectors)
    POST   /api/v1/namespaces/<ns>/pods                          (name or generateName)
    GET    /api/v1/namespaces/<ns>/pods/<name>
    DELETE /api/v1/namespaces/<ns>/pods/<name>
    POST   /api/v1/namespaces/<ns>/secrets                       (`manage.py pool_token`)
    PUT    /api/v1/namespaces/<ns>/secrets/<name>

with errors as Kubernetes `Status` objects, and test controls to move pods through their
phases, lose them behind poolsadmin's back, and inject failures and delays.

Standard library only and independent of Django and of the rest of poolsadmin: the tests
and the zero-setup demo (`manage.py demo`, SPEC 10) both run it in-process.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import string
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")

# Kubernetes' validation, reduced to what catches an adapter bug: names are DNS-1123
# subdomains, label values at most 63 characters of [A-Za-z0-9_.-] starting and ending
# alphanumeric, label keys an optional DNS prefix and a name like a value.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAME_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PATH_RE = re.compile(r"^/api/v1/namespaces/(?P<namespace>[^/]+)/pods(?:/(?P<name>[^/]+))?/?$")
_SECRET_PATH_RE = re.compile(
    r"^/api/v1/namespaces/(?P<namespace>[^/]+)/secrets(?:/(?P<name>[^/]+))?/?$"
)
# The API server truncates generateName so that prefix + 5 random characters fit in 63.
_GENERATE_NAME_MAX = 58

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class _Fault:
    remaining: int
    method: str | None
    status: int = 500
    seconds: float = 0.0


class ApiStatusError(Exception):
    """Raised inside the handler; answered as a Kubernetes Status object."""

    def __init__(
        self, code: int, message: str, *, reason: str = "", details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "")
        self.details = details


def status_body(
    code: int, message: str, reason: str = "", details: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _not_found(name: str) -> ApiStatusError:
    return ApiStatusError(404, f'pods "{name}" not found', details={"name": name, "kind": "pods"})


def _invalid(name: str, field: str, value: object, why: str) -> ApiStatusError:
    return ApiStatusError(
        422,
        f'Pod "{name}" is invalid: {field}: Invalid value: {json.dumps(value)}: {why}',
        details={"name": name, "kind": "Pod", "causes": [{"field": field, "message": why}]},
    )


def parse_label_selector(selector: str) -> list[tuple[str, str, str]]:
    """`a=b,c==d,e!=f` as (key, op, value) triples; comma means AND. Set-based selectors
    (`in`, `notin`, `exists`) are refused: the adapter does not use them, and silently
    matching everything would hide a bug."""
    requirements: list[tuple[str, str, str]] = []
    for part in (p.strip() for p in selector.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"([^=!\s]+)\s*(!=|==|=)\s*([^=!,\s]*)", part)
        if match is None:
            raise ApiStatusError(
                400, f"unable to parse requirement: {part!r} (the fake supports =, == and != only)"
            )
        key, op, value = match.groups()
        requirements.append((key, "!=" if op == "!=" else "=", value))
    return requirements


def _matches(labels: dict[str, str], requirements: list[tuple[str, str, str]]) -> bool:
    # As in Kubernetes, `key!=value` also matches objects without the key.
    return all((labels.get(key) == value) == (op == "=") for key, op, value in requirements)


def _timestamp(moment: datetime) -> str:
    # RFC 3339 in UTC with second precision, exactly as the API server writes it.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubeServer:
    """An in-memory pod store behind a threaded HTTP server on 127.0.0.1.

    Controls are thread-safe and may be called while the client is talking to the server.
    """

    def __init__(
        self,
        *,
        auto_run: bool = False,
        graceful_delete: bool = False,
        clock: Callable[[], datetime] | None = None,
        seed: int | None = None,
    ) -> None:
        # New pods start Pending, as on a real cluster; auto_run makes them Running at once.
        self.auto_run = auto_run
        # A real DELETE starts a graceful termination: the pod stays, with deletionTimestamp,
        # until the kubelet is done. Off by default (deleted at once); on, a deleted pod stays
        # until `complete_deletion`.
        self.graceful_delete = graceful_delete
        self.clock = clock or (lambda: datetime.now(UTC))
        self.requests_log: list[LoggedRequest] = []
        # Exceptions the handler did not expect: a bug in the fake, not a simulated failure.
        self.errors: list[BaseException] = []
        self._random = random.Random(seed)
        self._suffixes: list[str] = []
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self._resource_version = 1000
        self._failures: list[_Fault] = []
        self._delays: list[_Fault] = []
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake Kubernetes API server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKubeServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, fake=self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            # stop() waits up to one poll interval; every test stops a server.
            kwargs={"poll_interval": 0.01},
            name="fake-kube-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        # Wakes delayed requests so a timed-out test does not leave a sleeping thread behind.
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeKubeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- test controls -------------------------------------------------------------------------

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Copies of the stored pods (all namespaces when None), ordered by namespace, name."""
        with self._lock:
            return [
                copy.deepcopy(pod)
                for (ns, _name), pod in sorted(self._pods.items())
                if namespace is None or ns == namespace
            ]

    def pod(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        with self._lock:
            key = self._find(name, namespace)
            return copy.deepcopy(self._pods[key]) if key else None

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        phase: str = "Pending",
        image: str = "busybox",
        uid: str = "",
    ) -> dict[str, Any]:
        """A pod created outside poolsadmin (kubectl, another controller). `uid`: the uid it
        had before (the demo puts back the cluster it had, which lives in memory)."""
        manifest = {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": image}]},
        }
        with self._lock:
            pod = self._create(namespace, manifest)
            pod["status"]["phase"] = self._check_phase(phase)
            if uid:
                pod["metadata"]["uid"] = uid
            return copy.deepcopy(pod)

    def secret(self, name: str, namespace: str) -> dict[str, Any] | None:
        """A copy of a stored Secret, `data` base64-encoded as the API server keeps it."""
        with self._lock:
            found = self._secrets.get((namespace, name))
            return copy.deepcopy(found) if found else None

    def secret_value(self, name: str, namespace: str, key: str) -> str | None:
        """One key of a stored Secret, decoded; None when the Secret or the key is missing."""
        stored = self.secret(name, namespace)
        if stored is None or key not in stored["data"]:
            return None
        return base64.b64decode(stored["data"][key]).decode()

    def set_phase(self, name: str, phase: str, namespace: str | None = None) -> None:
        with self._lock:
            key = self._require(name, namespace)
            self._pods[key]["status"]["phase"] = self._check_phase(phase)
            self._touch(self._pods[key])

    def delete_behind_back(self, name: str, namespace: str | None = None) -> None:
        """The pod disappears without poolsadmin asking: eviction, node loss, kubectl delete."""
        with self._lock:
            del self._pods[self._require(name, namespace)]

    def complete_deletion(self, name: str, namespace: str | None = None) -> None:
        """The kubelet finished terminating a gracefully deleted pod."""
        with self._lock:
            key = self._require(name, namespace)
            if "deletionTimestamp" not in self._pods[key]["metadata"]:
                raise ValueError(f"pod {name} was not deleted")
            del self._pods[key]

    def fail_next(self, n: int = 1, status: int = 500, *, method: str | None = None) -> None:
        """The next `n` requests (of `method`, if given) fail with `status`."""
        with self._lock:
            self._failures.append(_Fault(remaining=n, method=method, status=status))

    def delay_next(self, n: int, seconds: float, *, method: str | None = None) -> None:
        """The next `n` requests (of `method`, if given) are answered after `seconds`.

        The request is still carried out after the delay, as on a real server: a client that
        timed out on a create does not know whether the pod exists.
        """
        with self._lock:
            self._delays.append(_Fault(remaining=n, method=method, seconds=seconds))

    def next_suffixes(self, *suffixes: str) -> None:
        """Use these instead of random generateName suffixes (to provoke a name collision)."""
        with self._lock:
            self._suffixes.extend(suffixes)

    # --- the store (callers hold self._lock) ---------------------------------------------------

    def _find(self, name: str, namespace: str | None) -> tuple[str, str] | None:
        keys = [key for key in self._pods if key[1] == name and namespace in (None, key[0])]
        if len(keys) > 1:
            raise ValueError(f"pod {name} exists in several namespaces; name one")
        return keys[0] if keys else None

    def _require(self, name: str, namespace: str | None) -> tuple[str, str]:
        key = self._find(name, namespace)
        if key is None:
            raise KeyError(f"no pod {name}")
        return key

    @staticmethod
    def _check_phase(phase: str) -> str:
        if phase not in PHASES:
            raise ValueError(f"{phase!r} is not a pod phase ({', '.join(PHASES)})")
        return phase

    def _touch(self, pod: dict[str, Any]) -> None:
        self._resource_version += 1
        pod["metadata"]["resourceVersion"] = str(self._resource_version)

    def _take(self, faults: list[_Fault], method: str) -> _Fault | None:
        for fault in faults:
            if fault.remaining > 0 and fault.method in (None, method):
                fault.remaining -= 1
                if fault.remaining == 0:
                    faults.remove(fault)
                return fault
        return None

    def _create(self, namespace: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiStatusError(400, "the body of the request was not a Pod object")
        if body.get("kind", "Pod") != "Pod" or body.get("apiVersion", "v1") != "v1":
            raise ApiStatusError(400, "the API version in the data does not match v1/Pod")
        metadata = copy.deepcopy(body.get("metadata") or {})
        if metadata.get("namespace", namespace) != namespace:
            raise ApiStatusError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        name = metadata.get("name") or ""
        if not name:
            prefix = metadata.get("generateName") or ""
            if not prefix:
                raise _invalid("", "metadata.name", "", "name or generateName is required")
            name = prefix[:_GENERATE_NAME_MAX] + self._suffix()
        if len(name) > 253 or not _NAME_RE.match(name):
            raise _invalid(
                name,
                "metadata.name",
                name,
                "a lowercase RFC 1123 subdomain must consist of "
                "lower case alphanumeric characters, '-' or '.'",
            )
        labels = metadata.get("labels") or {}
        for key, value in labels.items():
            prefix, _, label_name = key.rpartition("/")
            if (prefix and not _NAME_RE.match(prefix)) or not (
                len(label_name) <= 63 and _LABEL_NAME_RE.match(label_name)
            ):
                raise _invalid(name, "metadata.labels", key, "name part must be a valid label")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
                raise _invalid(
                    name,
                    "metadata.labels",
                    value,
                    "a valid label must be an empty "
                    "string or at most 63 alphanumeric characters, '-', '_' or '.'",
                )
        spec = copy.deepcopy(body.get("spec") or {})
        containers = spec.get("containers") or []
        if not containers:
            raise _invalid(name, "spec.containers", [], "Required value")
        for index, container in enumerate(containers):
            for required in ("name", "image"):
                if not container.get(required):
                    raise _invalid(
                        name, f"spec.containers[{index}].{required}", "", "Required value"
                    )
        if (namespace, name) in self._pods:
            raise ApiStatusError(
                409,
                f'pods "{name}" already exists',
                reason="AlreadyExists",
                details={"name": name, "kind": "pods"},
            )
        metadata.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=_timestamp(self.clock()),
        )
        metadata.pop("deletionTimestamp", None)
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": spec,
            "status": {"phase": "Running" if self.auto_run else "Pending"},
        }
        self._touch(pod)
        self._pods[(namespace, name)] = pod
        return pod

    def _suffix(self) -> str:
        if self._suffixes:
            return self._suffixes.pop(0)
        alphabet = string.ascii_lowercase + string.digits
        return "".join(self._random.choice(alphabet) for _ in range(5))

    # --- the API (called by the handler) -------------------------------------------------------

    def _secret_write(
        self, method: str, namespace: str, name: str | None, body: Any
    ) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind", "Secret") != "Secret":
            raise ApiStatusError(400, "the body of the request was not a Secret object")
        metadata = copy.deepcopy(body.get("metadata") or {})
        secret_name = metadata.get("name") or ""
        if not secret_name or not _NAME_RE.match(secret_name):
            raise _invalid(secret_name, "metadata.name", secret_name, "a valid name is required")
        if name is not None and name != secret_name:
            raise ApiStatusError(400, "the name of the object does not match the name on the URL")
        key = (namespace, secret_name)
        if method == "POST" and key in self._secrets:
            raise ApiStatusError(
                409,
                f'secrets "{secret_name}" already exists',
                reason="AlreadyExists",
                details={"name": secret_name, "kind": "secrets"},
            )
        if method == "PUT" and key not in self._secrets:
            raise ApiStatusError(
                404,
                f'secrets "{secret_name}" not found',
                details={"name": secret_name, "kind": "secrets"},
            )
        # As the API server does: stringData is merged into data (base64) and never returned.
        data = dict(body.get("data") or {})
        for item, value in (body.get("stringData") or {}).items():
            data[item] = base64.b64encode(str(value).encode()).decode()
        metadata.update(namespace=namespace, uid=str(uuid.uuid4()))
        secret = {
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": metadata,
            "type": body.get("type") or "Opaque",
            "data": data,
        }
        self._touch(secret)
        self._secrets[key] = secret
        return copy.deepcopy(secret)

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, dict[str, Any]]:
        secret_match = _SECRET_PATH_RE.match(path)
        if secret_match is not None and (method, secret_match["name"] is None) in (
            ("POST", True),
            ("PUT", False),
        ):
            with self._lock:
                secret = self._secret_write(
                    method, secret_match["namespace"], secret_match["name"], body
                )
            return (201 if method == "POST" else 200), secret
        match = _PATH_RE.match(path)
        if match is None:
            raise ApiStatusError(404, "the server could not find the requested resource")
        namespace, name = match["namespace"], match["name"]
        with self._lock:
            if name is None and method == "GET":
                if query.get("watch", ["false"])[0] in ("true", "1"):
                    raise ApiStatusError(400, "watch is not implemented by the fake API server")
                requirements = parse_label_selector(query.get("labelSelector", [""])[0])
                items = [
                    copy.deepcopy(pod)
                    for (ns, _name), pod in sorted(self._pods.items())
                    if ns == namespace
                    and _matches(pod["metadata"].get("labels") or {}, requirements)
                ]
                return 200, {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._resource_version)},
                    "items": items,
                }
            if name is None and method == "POST":
                return 201, copy.deepcopy(self._create(namespace, body))
            if name is not None and method == "GET":
                pod = self._pods.get((namespace, name))
                if pod is None:
                    raise _not_found(name)
                return 200, copy.deepcopy(pod)
            if name is not None and method == "DELETE":
                pod = self._pods.get((namespace, name))
                if pod is None:
                    raise _not_found(name)
                if not self.graceful_delete:
                    del self._pods[(namespace, name)]
                    return 200, copy.deepcopy(pod)
                if "deletionTimestamp" not in pod["metadata"]:
                    pod["metadata"]["deletionTimestamp"] = _timestamp(self.clock())
                    pod["metadata"]["deletionGracePeriodSeconds"] = 30
                    self._touch(pod)
                return 200, copy.deepcopy(pod)
        raise ApiStatusError(
            405,
            f"the server does not allow this method on the requested resource ({method} {path})",
        )

    def before(self, method: str) -> ApiStatusError | None:
        """Injected delay (honoured here) and failure (returned) for this request."""
        with self._lock:
            delay = self._take(self._delays, method)
            failure = self._take(self._failures, method)
        if delay is not None and self._stopping.wait(delay.seconds):
            raise _Stopping
        if failure is not None:
            return ApiStatusError(failure.status, f"injected failure ({failure.status})")
        return None


class _Stopping(Exception):
    """The server is shutting down while a request was delayed: drop the request."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        fake: FakeKubeServer,
    ) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        # A client that timed out has closed its end; writing the late answer fails. That is
        # the scenario under test, not an error.
        if isinstance(exc, ConnectionError | _Stopping):
            return
        if exc is not None:
            self.fake.errors.append(exc)
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    # HTTP/1.0: one request per connection, so no idle keep-alive thread outlives a test.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        return  # the requests_log is the record; stderr noise would drown test output

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        fake.requests_log.append(
            LoggedRequest(
                method=method,
                path=split.path,
                query=query,
                headers={key.lower(): value for key, value in self.headers.items()},
                body=body,
            )
        )
        try:
            failure = fake.before(method)
            if failure is not None:
                raise failure
            if isinstance(body, str):
                raise ApiStatusError(400, "the body of the request is not JSON")
            code, payload = fake.handle(method, split.path, query, body)
        except ApiStatusError as exc:
            code, payload = exc.code, status_body(exc.code, exc.message, exc.reason, exc.details)
        except _Stopping:
            raise
        except Exception as exc:  # a bug in the fake: answer like the API server, and record it
            fake.errors.append(exc)
            code, payload = 500, status_body(500, f"fake API server error: {exc!r}")
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)


def start_fake_kube(
    *,
    auto_run: bool = False,
    graceful_delete: bool = False,
    clock: Callable[[], datetime] | None = None,
    seed: int | None = None,
) -> FakeKubeServer:
    """A running fake API server; stop it with `.stop()` or use it as a context manager."""
    return FakeKubeServer(
        auto_run=auto_run, graceful_delete=graceful_delete, clock=clock, seed=seed
    ).start()

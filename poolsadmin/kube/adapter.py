"""The one module that talks to Kubernetes (STYLE rule 7, SPEC 10).

Everything else depends on `KubeApi`, `PodInfo` and `KubeError`; nothing else imports
`kubernetes`, so the cluster can be replaced by the fake API server in tests and in the demo,
and a client upgrade touches one file. A test walks `poolsadmin/` to keep it that way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import urllib3
from django.core.exceptions import ImproperlyConfigured
from django.utils.text import slugify
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from poolsadmin.kube.config import KubeConfig

if TYPE_CHECKING:
    from poolsadmin.pools.models import AgentPool

_T = TypeVar("_T")


# The reconciler finds a pool's pods by this label only, so a pod keeps belonging to its pool
# whatever its name, and pods created by hand with the label are adopted (SPEC 5).
POOL_LABEL = "poolsadmin/pool"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# A short hash of the pool's pod template fields at creation time: the autoscaler replaces
# idle pods whose hash is not the pool's current one (a changed template never kills work).
TEMPLATE_HASH_LABEL = "poolsadmin/template-hash"
TEMPLATE_HASH_LENGTH = 12
# The pool fields a pod is built from (pod_manifest). Namespace is not one: a pod in another
# namespace is not listed at all.
TEMPLATE_FIELDS = (
    "pod_image",
    "pod_image_pull_policy",
    "pod_command",
    "pod_args",
    "pod_env",
    "pod_cpu_request",
    "pod_cpu_limit",
    "pod_memory_request",
    "pod_memory_limit",
    "pod_service_account",
)
MANAGED_BY = "poolsadmin"
CONTAINER_NAME = "agent"
TOKEN_SECRET_KEY = "token"
ENV_URL = "POOLSADMIN_URL"
ENV_TOKEN = "POOLSADMIN_AGENT_TOKEN"
ENV_AGENT_NAME = "POOLSADMIN_AGENT_NAME"
# The pod's uid: a new pod under an old name registers under it with this (`manage.py agent`).
# Pods never restart their container (restart_policy Never), so an agent never needs to keep
# its identity across a restart in a pod.
ENV_POD_UID = "POOLSADMIN_POD_UID"
RESERVED_ENV = frozenset({ENV_URL, ENV_TOKEN, ENV_AGENT_NAME, ENV_POD_UID})
# The API server appends 5 characters to generateName. Keeping the prefix short keeps the pod
# name (which is also the agent name and the hostname) readable and under the 63-character
# hostname limit.
MAX_NAME_PREFIX = 40


@dataclass(frozen=True)
class PodInfo:
    name: str
    phase: str
    labels: dict[str, str]
    created_at: datetime | None
    # Set once a delete was accepted: the pod may linger while it terminates gracefully, and
    # must not be counted as capacity or adopted again.
    deletion_requested: bool
    # The API server's uid: a pod created again under the same name has another one.
    uid: str = ""


class KubeError(Exception):
    """The one error the rest of poolsadmin sees from the cluster.

    `retryable` says whether the same call may succeed later unchanged (server errors,
    throttling, conflicts, timeouts, connection failures); the loops retry on their next pass
    and only report the others loudly.
    """

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        # Kubernetes' Status.reason ("NotFound", "AlreadyExists", "Forbidden", ...) when known.
        self.reason = reason


class KubeApi(Protocol):
    """What the reconciler and the autoscaler may ask of a cluster."""

    def list_pods(self, *, namespace: str, pool_id: str) -> list[PodInfo]: ...

    def create_pod(
        self, *, pool: AgentPool, server_url: str, token_secret_name: str
    ) -> PodInfo: ...

    def get_pod(self, *, namespace: str, name: str) -> PodInfo | None: ...

    def delete_pod(self, *, namespace: str, name: str) -> None: ...


def _configuration(config: KubeConfig) -> k8s.Configuration:
    # A fresh Configuration per client: the client's global default is process-wide state
    # that load_*_config would otherwise overwrite for every other user of the library.
    configuration = k8s.Configuration()
    try:
        if config.mode == "in_cluster":
            k8s_config.load_incluster_config(client_configuration=configuration)
        elif config.mode == "kubeconfig":
            k8s_config.load_kube_config(
                config_file=config.kubeconfig_path or None,
                context=config.context or None,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            configuration.host = config.url.rstrip("/")
            configuration.verify_ssl = config.verify_ssl
            if config.token:
                configuration.api_key = {"BearerToken": config.token}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
    except ConfigException as exc:
        raise ImproperlyConfigured(f"Kubernetes ({config.mode}): {exc}") from exc
    # No hidden retries: urllib3 would retry connection errors 3 times, multiplying the
    # timeout a loop step waits and re-sending a POST whose pod may already exist (two pods
    # for one scale-up). The loops retry on their next pass, after re-listing.
    configuration.retries = False
    return configuration


# --- errors ----------------------------------------------------------------------------------


def _api_error(exc: ApiException, action: str) -> KubeError:
    status = exc.status if isinstance(exc.status, int) and exc.status > 0 else None
    message, reason = "", ""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or "")
        reason = str(body.get("reason") or "")
    if status is None:
        # Status 0 is how the client reports a TLS failure (or a request it could not
        # build): a certificate does not fix itself, so retrying only hides it.
        return KubeError(f"{action}: {exc.reason}", retryable=False)
    # 5xx: the API server or etcd is struggling. 429: throttled (priority and fairness).
    # 409: a generateName collision or a stale write; a new attempt draws a new name or
    # re-reads. Other 4xx (forbidden, invalid) stay wrong until a human changes something.
    retryable = status >= 500 or status in (409, 429)
    detail = message or str(exc.reason or "")
    return KubeError(
        f"{action}: {status} {reason or exc.reason}: {detail}",
        retryable=retryable,
        status=status,
        reason=reason,
    )


# --- the client --------------------------------------------------------------------------------


def pod_name_prefix(pool: AgentPool) -> str:
    """generateName for a pool's pods: a DNS-safe slug of the pool name, else of its id."""
    for candidate in (pool.name, pool.pool_id):
        slug = re.sub(r"-{2,}", "-", slugify(candidate).replace("_", "-"))
        slug = slug[:MAX_NAME_PREFIX].strip("-")
        if slug:
            return f"{slug}-"
    return "agent-"


def _env_value(value: object) -> str:
    # pod_env is JSON: numbers and booleans are written as JSON (true, 3), not Python (True).
    return value if isinstance(value, str) else json.dumps(value)


def _template_list(pool: AgentPool, field_name: str) -> list[str] | None:
    # JSON fields: a string here would otherwise be split into one argument per character.
    value = getattr(pool, field_name)
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise KubeError(f"pool {pool.pool_id}: {field_name} must be a list", retryable=False)
    return [str(part) for part in value]


def template_hash(pool: AgentPool) -> str:
    """A short sha256 of the pool's pod template fields (canonical JSON, sorted keys). Equal
    templates give equal hashes whatever the key order of pod_env; a valid label value."""
    fields = {name: getattr(pool, name) for name in TEMPLATE_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:TEMPLATE_HASH_LENGTH]


def pod_manifest(*, pool: AgentPool, server_url: str, token_secret_name: str) -> k8s.V1Pod:
    """The pod for one agent of `pool`, from the pool's template."""
    # poolsadmin's own variables come first so the template's values can refer to them with
    # $(POOLSADMIN_AGENT_NAME); the template cannot override them, least of all the token,
    # which must only ever come from the Secret.
    env = [
        k8s.V1EnvVar(name=ENV_URL, value=server_url),
        k8s.V1EnvVar(
            name=ENV_TOKEN,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=token_secret_name, key=TOKEN_SECRET_KEY)
            ),
        ),
        # The pod name is the agent name (SPEC 7): the agent registers under it and the
        # reconciler matches agents to pods by it.
        k8s.V1EnvVar(
            name=ENV_AGENT_NAME,
            value_from=k8s.V1EnvVarSource(
                field_ref=k8s.V1ObjectFieldSelector(field_path="metadata.name")
            ),
        ),
        k8s.V1EnvVar(
            name=ENV_POD_UID,
            value_from=k8s.V1EnvVarSource(
                field_ref=k8s.V1ObjectFieldSelector(field_path="metadata.uid")
            ),
        ),
    ]
    template_env = pool.pod_env or {}
    if not isinstance(template_env, dict):
        raise KubeError(f"pool {pool.pool_id}: pod_env must be an object", retryable=False)
    env += [
        k8s.V1EnvVar(name=str(key), value=_env_value(value))
        for key, value in template_env.items()
        if key not in RESERVED_ENV
    ]
    requests = {
        key: value
        for key, value in (("cpu", pool.pod_cpu_request), ("memory", pool.pod_memory_request))
        if value
    }
    limits = {
        key: value
        for key, value in (("cpu", pool.pod_cpu_limit), ("memory", pool.pod_memory_limit))
        if value
    }
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=pool.pod_image,
        image_pull_policy=pool.pod_image_pull_policy or None,
        command=_template_list(pool, "pod_command"),
        args=_template_list(pool, "pod_args"),
        env=env,
        resources=(
            k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None)
            if requests or limits
            else None
        ),
    )
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(
            generate_name=pod_name_prefix(pool),
            labels={
                POOL_LABEL: pool.pool_id,
                MANAGED_BY_LABEL: MANAGED_BY,
                TEMPLATE_HASH_LABEL: template_hash(pool),
            },
        ),
        spec=k8s.V1PodSpec(
            containers=[container],
            # An agent that exits is done: the pod ends Succeeded/Failed and the reconciler
            # deletes it; the autoscaler, not the kubelet, decides whether a new one is needed.
            restart_policy="Never",
            service_account_name=pool.pod_service_account or None,
        ),
    )


def _timestamp(value: object) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"a timestamp must be a string, not {value!r}")
    # RFC 3339 ("2026-12-01T10:00:00Z", fractions allowed), always UTC from the API server.
    return datetime.fromisoformat(value).astimezone(UTC)


def _pod_info(pod: object) -> PodInfo:
    """The fields poolsadmin reads of one pod, from the API server's JSON. A shape no pod has
    is a ValueError (the answer will not become readable by asking again)."""
    if not isinstance(pod, dict):
        raise ValueError(f"a pod must be an object, not {type(pod).__name__}")
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    if not (isinstance(meta, dict) and isinstance(status, dict) and isinstance(labels, dict)):
        raise ValueError("a pod's metadata, labels and status must be objects")
    return PodInfo(
        name=str(meta.get("name") or ""),
        phase=str(status.get("phase") or "Unknown"),
        labels={str(key): str(value) for key, value in labels.items()},
        created_at=_timestamp(meta.get("creationTimestamp")),
        deletion_requested=meta.get("deletionTimestamp") is not None,
        uid=str(meta.get("uid") or ""),
    )


def _pod_infos(listed: object) -> list[PodInfo]:
    # Never an empty list for an answer that is not a PodList: the reconciler would take
    # every pod of the pool for vanished and fail its work.
    items = listed.get("items") if isinstance(listed, dict) else None
    if not isinstance(items, list):
        raise ValueError("the answer to a pod listing is not a PodList")
    return [_pod_info(pod) for pod in items]


def _json(answer: object) -> object:
    """The body of an answer the client did not parse (`_preload_content=False`: the call
    returns urllib3's response, whatever the client's annotations say)."""
    response = cast(urllib3.BaseHTTPResponse, answer)
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _require_namespace(namespace: str, action: str) -> None:
    if not namespace:
        raise KubeError(f"{action}: the pool has no namespace", retryable=False)


class KubeClient:
    """`KubeApi` over the official client. Every call is bounded by the configured timeout."""

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._timeout = config.timeout_seconds
        self._api_client = k8s.ApiClient(_configuration(config))
        self._core = k8s.CoreV1Api(self._api_client)

    def close(self) -> None:
        self._api_client.close()

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, action: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except ApiException as exc:
            raise _api_error(exc, action) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Timeouts, refused or reset connections: the API server may be restarting.
            raise KubeError(f"{action}: {type(exc).__name__}: {exc}", retryable=True) from exc
        except ValueError as exc:
            # The client validates what it sends and what it receives (pydantic): an answer
            # it cannot read will not become readable by asking again.
            raise KubeError(f"{action}: {exc}", retryable=False) from exc

    def list_pods(self, *, namespace: str, pool_id: str) -> list[PodInfo]:
        action = f"list pods of {pool_id} in {namespace}"
        _require_namespace(namespace, action)
        # The raw JSON, read for the six fields of PodInfo: the client's models would parse
        # every field of every pod (spec, containers, status conditions), which at 1,000 pods
        # was most of a reconcile pass.
        return self._call(
            action,
            lambda: _pod_infos(
                _json(
                    self._core.list_namespaced_pod(
                        namespace,
                        label_selector=f"{POOL_LABEL}={pool_id}",
                        _request_timeout=self._timeout,
                        _preload_content=False,
                    )
                )
            ),
        )

    def create_pod(self, *, pool: AgentPool, server_url: str, token_secret_name: str) -> PodInfo:
        action = f"create a pod for {pool.pool_id} in {pool.namespace}"
        _require_namespace(pool.namespace, action)
        # The manifest is built inside the call so a template the client refuses (pydantic)
        # is a KubeError naming the pool, like one the API server refuses. A timed-out create
        # may still have happened: the caller must not assume no pod was made, and finds it
        # by label on the next list.
        return self._call(
            action,
            lambda: _pod_info(
                _json(
                    self._core.create_namespaced_pod(
                        pool.namespace,
                        pod_manifest(
                            pool=pool, server_url=server_url, token_secret_name=token_secret_name
                        ),
                        _request_timeout=self._timeout,
                        _preload_content=False,
                    )
                )
            ),
        )

    def get_pod(self, *, namespace: str, name: str) -> PodInfo | None:
        action = f"get pod {name} in {namespace}"
        _require_namespace(namespace, action)
        try:
            return self._call(
                action,
                lambda: _pod_info(
                    _json(
                        self._core.read_namespaced_pod(
                            name, namespace, _request_timeout=self._timeout, _preload_content=False
                        )
                    )
                ),
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def put_token_secret(self, *, namespace: str, name: str, pool_id: str, token: str) -> str:
        """Create the Secret agent pods read their pool token from (key `token`), or replace
        its contents if it exists. Returns "created" or "replaced". The token is never part
        of an error message: the API server does not echo data back, and neither do we."""
        action = f"write secret {name} in {namespace}"
        _require_namespace(namespace, action)
        secret = k8s.V1Secret(
            api_version="v1",
            kind="Secret",
            metadata=k8s.V1ObjectMeta(
                name=name, labels={POOL_LABEL: pool_id, MANAGED_BY_LABEL: MANAGED_BY}
            ),
            type="Opaque",
            string_data={TOKEN_SECRET_KEY: token},
        )
        try:
            self._call(
                action,
                lambda: self._core.create_namespaced_secret(
                    namespace, secret, _request_timeout=self._timeout
                ),
            )
            return "created"
        except KubeError as exc:
            if exc.status != 409:
                raise
        # Replace, not patch: no key of an earlier token survives. No read first, so the
        # RBAC needs create and update only (never get: poolsadmin reads no Secret).
        self._call(
            action,
            lambda: self._core.replace_namespaced_secret(
                name, namespace, secret, _request_timeout=self._timeout
            ),
        )
        return "replaced"

    def delete_pod(self, *, namespace: str, name: str) -> None:
        action = f"delete pod {name} in {namespace}"
        _require_namespace(namespace, action)
        try:
            self._call(
                action,
                lambda: self._core.delete_namespaced_pod(
                    name, namespace, _request_timeout=self._timeout
                ),
            )
        except KubeError as exc:
            # Idempotent: a pod that is already gone is what the caller wanted. Two replicas
            # of a loop, or a retry after a timed-out delete, land here.
            if exc.status != 404:
                raise

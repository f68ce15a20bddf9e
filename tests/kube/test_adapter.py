"""The Kubernetes adapter, with the real `kubernetes` client talking HTTP to the fake API."""

from __future__ import annotations

import ast
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from poolsadmin.kube.adapter import (
    KubeApi,
    KubeClient,
    KubeConfig,
    KubeError,
    PodInfo,
    template_hash,
)
from poolsadmin.kube.config import kube_config_from_env
from poolsadmin.pools.models import AgentPool
from tests.kube.fake_api import FakeKubeServer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "build-agents-token"


def _pool(**overrides: Any) -> AgentPool:
    # Unsaved: the adapter reads the template fields only, so these tests need no database.
    fields: dict[str, Any] = {
        "pool_id": "pool-z73eh8ihywlmgx0x",
        "name": "Build agents",
        "pool_type": "k8s",
        "namespace": "ci",
        "pod_image": "registry.example.com/agent:1.4",
        "pod_image_pull_policy": "Always",
        "pod_command": ["python", "manage.py", "agent"],
        "pod_args": ["--url", "$(POOLSADMIN_URL)"],
        "pod_env": {"LOG_LEVEL": "debug", "SLOTS": 4, "DRY": True},
        "pod_cpu_request": "500m",
        "pod_cpu_limit": "2",
        "pod_memory_request": "512Mi",
        "pod_memory_limit": "2Gi",
        "pod_service_account": "poolsadmin-agent",
    }
    fields.update(overrides)
    return AgentPool(**fields)


def _create(client: KubeClient, pool: AgentPool | None = None) -> PodInfo:
    return client.create_pod(
        pool=pool or _pool(), server_url="http://poolsadmin:8000", token_secret_name=SECRET
    )


def _client(server: FakeKubeServer, timeout: float = 5.0) -> KubeClient:
    return KubeClient(KubeConfig(mode="url", url=server.url, timeout_seconds=timeout))


# --- create ------------------------------------------------------------------------------------


def test_created_pods_are_named_after_the_pool_with_a_unique_suffix(
    kube_client: KubeClient,
) -> None:
    first, second = _create(kube_client), _create(kube_client)

    assert first.name != second.name
    for pod in (first, second):
        assert pod.name.startswith("build-agents-")
        assert len(pod.name) == len("build-agents-") + 5


def test_a_pool_name_that_slugs_to_nothing_names_pods_after_the_pool_id(
    kube_client: KubeClient,
) -> None:
    pod = _create(kube_client, _pool(name="!!!"))

    assert pod.name.startswith("pool-z73eh8ihywlmgx0x-")


def test_a_long_pool_name_is_cut_to_a_readable_dns_safe_prefix(kube_client: KubeClient) -> None:
    pod = _create(kube_client, _pool(name="Ünïcode & Spaces__and_underscores " * 4))

    assert pod.name.startswith("unicode-spaces-and-underscores-unicode-")
    # 40 characters of prefix, a dash and the 5 the server adds.
    assert len(pod.name) <= 46


def test_created_pods_carry_the_pool_label_and_the_managed_by_label(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _create(kube_client)

    expected = {
        "poolsadmin/pool": "pool-z73eh8ihywlmgx0x",
        "app.kubernetes.io/managed-by": "poolsadmin",
        "poolsadmin/template-hash": template_hash(_pool()),
    }
    assert pod.labels == expected
    assert fake_kube.pods("ci")[0]["metadata"]["labels"] == expected


def test_the_agent_container_is_built_from_the_pool_template(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    _create(kube_client)

    (stored,) = fake_kube.pods("ci")
    spec = stored["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "agent"
    assert container["image"] == "registry.example.com/agent:1.4"
    assert container["imagePullPolicy"] == "Always"
    assert container["command"] == ["python", "manage.py", "agent"]
    assert container["args"] == ["--url", "$(POOLSADMIN_URL)"]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert spec["serviceAccountName"] == "poolsadmin-agent"
    assert spec["restartPolicy"] == "Never"


def test_the_agent_learns_url_token_and_its_own_pod_name_from_its_environment(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    _create(kube_client)

    env = fake_kube.pods("ci")[0]["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "POOLSADMIN_URL", "value": "http://poolsadmin:8000"},
        # The token never appears in the pod spec, only a reference to the Secret.
        {
            "name": "POOLSADMIN_AGENT_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "token"}},
        },
        # Downward API: the pod name is the agent name.
        {
            "name": "POOLSADMIN_AGENT_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        },
        # And its uid: a new pod under an old name proves with it that it is new.
        {
            "name": "POOLSADMIN_POD_UID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
        },
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "SLOTS", "value": "4"},
        {"name": "DRY", "value": "true"},
    ]


def test_the_template_cannot_override_the_variables_poolsadmin_sets(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = _pool(pod_env={"POOLSADMIN_AGENT_TOKEN": "plaintext", "POOLSADMIN_URL": "http://evil"})

    _create(kube_client, pool)

    env = fake_kube.pods("ci")[0]["spec"]["containers"][0]["env"]
    assert [var["name"] for var in env] == [
        "POOLSADMIN_URL",
        "POOLSADMIN_AGENT_TOKEN",
        "POOLSADMIN_AGENT_NAME",
        "POOLSADMIN_POD_UID",
    ]
    assert env[0]["value"] == "http://poolsadmin:8000"
    assert "value" not in env[1]


def test_template_fields_left_empty_are_left_out_of_the_pod(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = _pool(
        pod_image_pull_policy="",
        pod_command=[],
        pod_args=[],
        pod_env={},
        pod_cpu_request="",
        pod_cpu_limit="",
        pod_memory_request="",
        pod_memory_limit="",
        pod_service_account="",
    )

    _create(kube_client, pool)

    spec = fake_kube.pods("ci")[0]["spec"]
    container = spec["containers"][0]
    assert set(container) == {"name", "image", "env"}
    assert set(spec) == {"containers", "restartPolicy"}


def test_only_requests_or_only_limits_are_sent_as_set(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = _pool(pod_cpu_limit="", pod_memory_limit="", pod_memory_request="")

    _create(kube_client, pool)

    assert fake_kube.pods("ci")[0]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "500m"}
    }


def test_a_new_pod_is_pending_until_the_cluster_runs_it(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _create(kube_client)
    assert pod.phase == "Pending"
    assert pod.deletion_requested is False

    fake_kube.set_phase(pod.name, "Running")

    assert kube_client.get_pod(namespace="ci", name=pod.name) == PodInfo(
        name=pod.name,
        phase="Running",
        labels=pod.labels,
        created_at=pod.created_at,
        deletion_requested=False,
        uid=str(fake_kube.pod(pod.name, "ci")["metadata"]["uid"]),  # type: ignore[index]
    )
    assert pod.uid  # the API server's, so that a pod made again under the name is told apart


def test_auto_run_starts_new_pods_running(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    fake_kube.auto_run = True

    assert _create(kube_client).phase == "Running"


def test_the_creation_time_is_the_servers_in_utc(kube_client: KubeClient) -> None:
    before = datetime.now(UTC).replace(microsecond=0)

    created_at = _create(kube_client).created_at

    assert created_at is not None
    assert created_at.tzinfo == UTC
    assert before <= created_at <= datetime.now(UTC)


def test_a_pod_without_a_namespace_is_refused_before_calling_the_cluster(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    with pytest.raises(KubeError) as caught:
        _create(kube_client, _pool(namespace=""))

    assert caught.value.retryable is False
    assert fake_kube.requests_log == []


def test_a_name_that_is_taken_is_a_retryable_409_already_exists(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    # The API server's random suffix collided with an existing pod: a new attempt draws a
    # new suffix, so it is worth retrying.
    fake_kube.next_suffixes("aaaaa", "aaaaa")
    assert _create(kube_client).name == "build-agents-aaaaa"

    with pytest.raises(KubeError) as caught:
        _create(kube_client)

    assert caught.value.status == 409
    assert caught.value.reason == "AlreadyExists"
    assert caught.value.retryable is True
    assert 'pods "build-agents-aaaaa" already exists' in str(caught.value)
    assert len(fake_kube.pods("ci")) == 1


def test_a_pool_id_that_is_no_valid_label_value_is_refused_and_not_retried(
    kube_client: KubeClient,
) -> None:
    with pytest.raises(KubeError) as caught:
        _create(kube_client, _pool(pool_id="p" * 64))

    assert caught.value.status == 422
    assert caught.value.retryable is False


# --- list, get, delete -------------------------------------------------------------------------


def test_listing_returns_only_the_pods_of_the_pool_in_the_namespace(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    ours = [_create(kube_client), _create(kube_client)]
    _create(kube_client, _pool(pool_id="pool-other", name="Other"))
    _create(kube_client, _pool(namespace="elsewhere"))
    fake_kube.add_pod("ci", "unrelated", labels={"app": "web"})

    pods = kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert sorted(pod.name for pod in pods) == sorted(pod.name for pod in ours)
    (request,) = [r for r in fake_kube.requests_log if r.method == "GET"]
    assert request.query["labelSelector"] == ["poolsadmin/pool=pool-z73eh8ihywlmgx0x"]


def test_listing_adopts_pods_created_by_hand_with_the_pool_label(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    fake_kube.add_pod(
        "ci", "handmade", labels={"poolsadmin/pool": "pool-z73eh8ihywlmgx0x"}, phase="Failed"
    )

    (pod,) = kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert (pod.name, pod.phase) == ("handmade", "Failed")


def test_listing_an_empty_pool_returns_nothing(kube_client: KubeClient) -> None:
    assert kube_client.list_pods(namespace="ci", pool_id="pool-empty") == []


def test_getting_a_missing_pod_returns_none(kube_client: KubeClient) -> None:
    assert kube_client.get_pod(namespace="ci", name="build-agents-gone0") is None


def test_deleting_a_pod_removes_it(fake_kube: FakeKubeServer, kube_client: KubeClient) -> None:
    pod = _create(kube_client)

    kube_client.delete_pod(namespace="ci", name=pod.name)

    assert fake_kube.pods("ci") == []
    assert kube_client.get_pod(namespace="ci", name=pod.name) is None


def test_deleting_a_missing_pod_is_not_an_error(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _create(kube_client)
    fake_kube.delete_behind_back(pod.name)

    kube_client.delete_pod(namespace="ci", name=pod.name)
    kube_client.delete_pod(namespace="ci", name=pod.name)

    assert [r.method for r in fake_kube.requests_log] == ["POST", "DELETE", "DELETE"]


def test_a_pod_being_deleted_gracefully_says_so_until_it_is_gone(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    fake_kube.graceful_delete = True
    pod = _create(kube_client)

    kube_client.delete_pod(namespace="ci", name=pod.name)

    (listed,) = kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")
    assert listed.deletion_requested is True
    fake_kube.complete_deletion(pod.name)
    assert kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x") == []


# --- errors --------------------------------------------------------------------------------------


def _calls(client: KubeClient) -> dict[str, Callable[[], object]]:
    return {
        "list": lambda: client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x"),
        "create": lambda: _create(client),
        "get": lambda: client.get_pod(namespace="ci", name="build-agents-aaaaa"),
        "delete": lambda: client.delete_pod(namespace="ci", name="build-agents-aaaaa"),
    }


@pytest.mark.parametrize(
    ("status", "reason", "retryable"),
    [
        (500, "InternalError", True),
        (503, "ServiceUnavailable", True),
        (429, "TooManyRequests", True),
        (409, "Conflict", True),
        (400, "BadRequest", False),
        (401, "Unauthorized", False),
        (403, "Forbidden", False),
        (422, "Invalid", False),
    ],
)
def test_an_api_error_says_whether_it_is_worth_retrying(
    fake_kube: FakeKubeServer, kube_client: KubeClient, status: int, reason: str, retryable: bool
) -> None:
    fake_kube.fail_next(1, status=status)

    with pytest.raises(KubeError) as caught:
        kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert caught.value.retryable is retryable
    assert f"injected failure ({status})" in caught.value.message


@pytest.mark.parametrize(
    "body", [b'{"kind": "Status", "status": "Success"}', b"[]", b'{"items": [7]}', b"<html>"]
)
def test_a_listing_answer_that_is_no_pod_list_is_an_error_never_an_empty_pool(
    body: bytes,
) -> None:
    """The adapter reads the listing's JSON itself: an answer it cannot read must not look
    like a pool without pods, whose every pod the reconciler would take for vanished."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with (
            KubeClient(KubeConfig(mode="url", url=url, timeout_seconds=5.0)) as client,
            pytest.raises(KubeError) as caught,
        ):
            client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")
    finally:
        server.shutdown()
        server.server_close()
    assert caught.value.retryable is False


@pytest.mark.parametrize("call", ["list", "create", "get", "delete"])
def test_every_call_turns_a_server_error_into_a_kube_error(
    fake_kube: FakeKubeServer, kube_client: KubeClient, call: str
) -> None:
    fake_kube.fail_next(1, status=500)

    with pytest.raises(KubeError) as caught:
        _calls(kube_client)[call]()

    assert caught.value.retryable is True
    # One failure, one request: the client does not retry behind the caller's back.
    assert len(fake_kube.requests_log) == 1


def test_a_failure_injected_for_one_method_leaves_the_others_alone(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    fake_kube.fail_next(1, status=500, method="POST")

    assert kube_client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x") == []
    with pytest.raises(KubeError):
        _create(kube_client)
    _create(kube_client)


@pytest.mark.parametrize("call", ["list", "create", "get", "delete"])
def test_every_call_gives_up_after_the_timeout_with_a_retryable_error(
    fake_kube: FakeKubeServer, call: str
) -> None:
    fake_kube.delay_next(1, 5.0)
    started = time.monotonic()

    with _client(fake_kube, timeout=0.5) as client, pytest.raises(KubeError) as caught:
        _calls(client)[call]()

    assert caught.value.retryable is True
    assert caught.value.status is None
    assert "timed out" in caught.value.message
    assert time.monotonic() - started < 2.0
    assert len(fake_kube.requests_log) == 1


def test_a_create_that_timed_out_may_still_have_made_the_pod(fake_kube: FakeKubeServer) -> None:
    # Why the autoscaler must re-list rather than assume a failed create made nothing.
    fake_kube.delay_next(1, 0.7, method="POST")

    with _client(fake_kube, timeout=0.5) as client:
        with pytest.raises(KubeError):
            _create(client)
        deadline = time.monotonic() + 3
        while not fake_kube.pods("ci") and time.monotonic() < deadline:
            time.sleep(0.02)

        (pod,) = client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")
    assert pod.name.startswith("build-agents-")


def test_an_unreachable_api_server_is_a_retryable_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused.
    config = KubeConfig(mode="url", url=f"http://127.0.0.1:{port}", timeout_seconds=0.5)

    with KubeClient(config) as client, pytest.raises(KubeError) as caught:
        client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert caught.value.retryable is True
    assert caught.value.status is None


def test_a_wrong_tls_certificate_is_not_retried() -> None:
    # A plain-HTTP fake spoken to over https fails the TLS handshake, as a bad certificate
    # would: retrying cannot fix it, so it must be reported.
    with FakeKubeServer() as server:
        url = server.url.replace("http://", "https://")
        config = KubeConfig(mode="url", url=url, timeout_seconds=0.5)
        with KubeClient(config) as client, pytest.raises(KubeError) as caught:
            client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert caught.value.retryable is False


# --- configuration -----------------------------------------------------------------------------


def test_url_mode_sends_the_bearer_token_and_never_shows_it(fake_kube: FakeKubeServer) -> None:
    config = KubeConfig(mode="url", url=fake_kube.url, token="s3cret-token")

    with KubeClient(config) as client:
        client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x")

    assert fake_kube.requests_log[0].headers["authorization"] == "Bearer s3cret-token"
    assert "s3cret-token" not in repr(config)


def test_the_client_satisfies_the_interface_the_loops_depend_on(
    kube_client: KubeClient,
) -> None:
    api: KubeApi = kube_client
    assert api.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x") == []


def test_in_cluster_mode_outside_a_cluster_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    with pytest.raises(ImproperlyConfigured, match="in_cluster"):
        KubeClient(KubeConfig(mode="in_cluster"))


def test_kubeconfig_mode_reads_the_file_and_context(
    tmp_path: Path, fake_kube: FakeKubeServer
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: "{fake_kube.url}"}}
users:
- name: robot
  user: {{token: from-kubeconfig}}
contexts:
- name: other
  context: {{cluster: fake, user: robot}}
current-context: missing
"""
    )
    config = KubeConfig(mode="kubeconfig", kubeconfig_path=str(kubeconfig), context="other")

    with KubeClient(config) as client:
        assert client.list_pods(namespace="ci", pool_id="pool-z73eh8ihywlmgx0x") == []

    assert fake_kube.requests_log[0].headers["authorization"] == "Bearer from-kubeconfig"


def test_the_environment_configures_the_client() -> None:
    config = kube_config_from_env(
        {
            "KUBE_MODE": "url",
            "KUBE_API_URL": "https://kube.example.com:6443/",
            "KUBE_TOKEN": "t0ken",
            "KUBE_VERIFY_SSL": "false",
            "KUBE_TIMEOUT_SECONDS": "2.5",
        }
    )

    assert config == KubeConfig(
        mode="url",
        url="https://kube.example.com:6443/",
        token="t0ken",
        verify_ssl=False,
        timeout_seconds=2.5,
    )


def test_with_nothing_set_the_client_runs_in_cluster() -> None:
    assert kube_config_from_env({}) == KubeConfig(mode="in_cluster", timeout_seconds=10.0)


def test_kubeconfig_mode_takes_the_standard_kubeconfig_variable_and_a_context() -> None:
    config = kube_config_from_env(
        {"KUBE_MODE": "kubeconfig", "KUBECONFIG": "/a:/b", "KUBE_CONTEXT": "prod"}
    )

    assert (config.kubeconfig_path, config.context) == ("/a:/b", "prod")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KUBE_MODE": "cluster"}, "KUBE_MODE='cluster' is not one of"),
        ({"KUBE_MODE": "url"}, "KUBE_API_URL='' must be an http"),
        ({"KUBE_MODE": "url", "KUBE_API_URL": "kube:6443"}, "KUBE_API_URL='kube:6443'"),
        ({"KUBE_API_URL": "https://kube"}, "KUBE_API_URL is only used with KUBE_MODE=url"),
        ({"KUBE_TOKEN": "t"}, "KUBE_TOKEN is only used with KUBE_MODE=url"),
        ({"KUBE_CONTEXT": "prod"}, "KUBE_CONTEXT is only used with KUBE_MODE=kubeconfig"),
        (
            {"KUBE_MODE": "url", "KUBE_API_URL": "http://k", "KUBE_VERIFY_SSL": "maybe"},
            "KUBE_VERIFY_SSL='maybe' is not a boolean",
        ),
        ({"KUBE_TIMEOUT_SECONDS": "soon"}, "KUBE_TIMEOUT_SECONDS='soon' is not a number"),
        ({"KUBE_TIMEOUT_SECONDS": "0"}, "KUBE_TIMEOUT_SECONDS=0 must be > 0"),
        ({"KUBE_TIMEOUT_SECONDS": "inf"}, "KUBE_TIMEOUT_SECONDS=inf must be > 0"),
    ],
)
def test_a_bad_kube_variable_fails_loudly_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        kube_config_from_env(env)

    assert message in str(caught.value)


# --- the boundary ------------------------------------------------------------------------------


def _kubernetes_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            # importlib.import_module("kubernetes...") and __import__("kubernetes...")
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names = [str(first.value)]
        if any(name == "kubernetes" or name.startswith("kubernetes.") for name in names):
            lines.append(getattr(node, "lineno", 0))
    return lines


def test_only_the_adapter_imports_kubernetes() -> None:
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "poolsadmin").rglob("*.py"))
        if (lines := _kubernetes_imports(path))
        and path != ROOT / "poolsadmin" / "kube" / "adapter.py"
    }

    assert offenders == {}
    # And the check itself works: the adapter is found.
    assert _kubernetes_imports(ROOT / "poolsadmin" / "kube" / "adapter.py")


def test_the_creation_time_follows_the_fake_servers_clock() -> None:
    past = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    with FakeKubeServer(clock=lambda: past) as server, _client(server) as client:
        pod = _create(client)
    assert pod.created_at == past
    assert pod.created_at < datetime.now(UTC) - timedelta(days=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("pod_command", "agent --run"), ("pod_args", {"a": 1}), ("pod_env", ["A=1"])],
)
def test_a_template_of_the_wrong_shape_is_refused_before_calling_the_cluster(
    fake_kube: FakeKubeServer, kube_client: KubeClient, field: str, value: object
) -> None:
    with pytest.raises(KubeError, match=field) as caught:
        _create(kube_client, _pool(**{field: value}))

    assert caught.value.retryable is False
    assert fake_kube.requests_log == []


# --- the agents' token Secret ------------------------------------------------------------------


def test_a_token_secret_is_created_with_the_token_under_its_key(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    outcome = kube_client.put_token_secret(
        namespace="ci", name=SECRET, pool_id="pool-z73eh8ihywlmgx0x", token="apt_one"
    )

    assert outcome == "created"
    assert fake_kube.secret_value(SECRET, "ci", "token") == "apt_one"
    stored = fake_kube.secret(SECRET, "ci")
    assert stored is not None
    assert stored["metadata"]["labels"] == {
        "poolsadmin/pool": "pool-z73eh8ihywlmgx0x",
        "app.kubernetes.io/managed-by": "poolsadmin",
    }


def test_writing_an_existing_token_secret_replaces_it(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    kube_client.put_token_secret(namespace="ci", name=SECRET, pool_id="pool-a", token="apt_old")
    outcome = kube_client.put_token_secret(
        namespace="ci", name=SECRET, pool_id="pool-a", token="apt_new"
    )

    assert outcome == "replaced"
    assert fake_kube.secret_value(SECRET, "ci", "token") == "apt_new"
    assert [(r.method, r.path) for r in fake_kube.requests_log] == [
        ("POST", "/api/v1/namespaces/ci/secrets"),
        ("POST", "/api/v1/namespaces/ci/secrets"),
        ("PUT", f"/api/v1/namespaces/ci/secrets/{SECRET}"),
    ]


def test_a_refused_token_secret_is_a_kube_error_without_the_token(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    fake_kube.fail_next(1, status=403, method="POST")
    with pytest.raises(KubeError) as caught:
        kube_client.put_token_secret(
            namespace="ci", name=SECRET, pool_id="pool-a", token="apt_secret_value"
        )
    assert caught.value.status == 403
    assert not caught.value.retryable
    assert "apt_secret_value" not in str(caught.value)

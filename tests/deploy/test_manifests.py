"""The Kubernetes manifests and the image, held against the code they run.

Rendered with `kubectl kustomize` (under CI=true a missing kubectl is a failure; `.ci/run`
installs Debian's kubernetes-client). What is checked comes from the code, not from a list
kept by hand: the variables settings.py and kube/config.py read, the Kubernetes API calls of
poolsadmin/kube/adapter.py, the URL patterns and management commands.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import get_commands
from django.urls import Resolver404, resolve
from kubernetes import client as k8s
from packaging.requirements import Requirement

from poolsadmin.worker.reconcile import LEASE_TTL_SECONDS, pool_lease_ttl

ROOT = Path(__file__).resolve().parents[2]
KUBE_DIR = ROOT / "deploy" / "kubernetes"
RENDERED = {
    "base": KUBE_DIR,
    "example": KUBE_DIR / "overlays" / "example",
}
# Not in the manifests, on purpose; each reason is the documentation (also in
# base/configmap.yaml). A variable settings.py reads must be set or listed here.
OPTIONAL_ENV = {
    "KUBE_API_URL": "KUBE_MODE=url only; the pods use in_cluster",
    "KUBE_TOKEN": "KUBE_MODE=url only",
    "KUBE_VERIFY_SSL": "KUBE_MODE=url only",
    "KUBECONFIG": "KUBE_MODE=kubeconfig only",
    "KUBE_CONTEXT": "KUBE_MODE=kubeconfig only",
    "SQLITE_BUSY_TIMEOUT_SECONDS": "SQLite only; the manifests use PostgreSQL",
    "POOLSADMIN_HEARING_TICK_SECONDS": "the 5 s default; pools' heartbeat timeouts assume it",
    "STATIC_ROOT": "the image collects static files into its default, POOLSADMIN_VAR_DIR",
    "SECURE_PROXY_SSL_HEADER": "daphne --proxy-headers already takes the scheme from the Ingress",
}
SETTINGS_SOURCES = (ROOT / "poolsadmin" / "settings.py", ROOT / "poolsadmin" / "kube" / "config.py")
ADAPTER = ROOT / "poolsadmin" / "kube" / "adapter.py"
APP_NAMESPACE = "poolsadmin"
SERVICE_ACCOUNT = "poolsadmin"
# The Secret the pods' envFrom names is not rendered (a template with known values would be
# applied by someone): its keys come from the template.
SECRET_TEMPLATE = KUBE_DIR / "base" / "secret.example.yaml"


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is missing (apt-get install kubernetes-client)")
        pytest.skip("kubectl is not installed (apt-get install kubernetes-client)")
    return found


@cache
def _render(path: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=sorted(RENDERED))
def manifests(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return _render(RENDERED[request.param])


def _of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict]]:
    """(workload, pod spec) of every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def _containers(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for workload, pod in _workloads(docs):
        for container in pod["containers"]:
            yield f"{workload['metadata']['name']}/{container['name']}", container


# --- environment --------------------------------------------------------------------------------


def _variables_read(source: Path) -> set[str]:
    """Every NAME in os.environ.get("NAME"), env.get("NAME"), env_int("NAME", ...),
    _env_bool(env, "NAME", ...): the first string argument of `get` on the environment or of
    a function whose name mentions env."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get":
            receiver = func.value
            reads_env = (isinstance(receiver, ast.Attribute) and receiver.attr == "environ") or (
                isinstance(receiver, ast.Name) and receiver.id in {"environ", "env"}
            )
        else:
            reads_env = "env" in getattr(func, "id", getattr(func, "attr", "")).lower()
        strings = [
            arg.value
            for arg in node.args
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        ]
        if reads_env and strings and re.fullmatch(r"[A-Z][A-Z0-9_]+", strings[0]):
            names.add(strings[0])
    return names


def _settings_variables() -> set[str]:
    names = set().union(*(_variables_read(source) for source in SETTINGS_SOURCES))
    # The parser finds what it must: a change of style that hides reads fails here.
    assert {"DATABASE_URL", "SECRET_KEY", "DEBUG", "KUBE_MODE", "KUBE_VERIFY_SSL"} <= names
    return names


def _secret_keys() -> dict[str, set[str]]:
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    return {template["metadata"]["name"]: set(template["stringData"])}


def _environment(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> set[str]:
    config_maps = {doc["metadata"]["name"]: doc for doc in _of_kind(docs, "ConfigMap")}
    secrets = _secret_keys()
    names = {item["name"] for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            names |= secrets[source["secretRef"]["name"]]
    return names


def test_every_variable_settings_read_is_set_in_each_container_or_documented_optional(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    read = _settings_variables()
    for where, container in _containers(manifests):
        missing = read - _environment(manifests, container) - set(OPTIONAL_ENV)
        assert not missing, f"{where} does not set {sorted(missing)}"


def test_the_optional_list_names_only_variables_settings_read_and_the_manifests_leave_unset(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    assert set(OPTIONAL_ENV) <= _settings_variables()
    for where, container in _containers(manifests):
        assert not set(OPTIONAL_ENV) & _environment(manifests, container), where


def test_production_settings_are_what_the_manifests_set(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    (config,) = _of_kind(manifests, "ConfigMap")
    assert config["data"]["DEBUG"] == "false"
    assert config["data"]["KUBE_MODE"] == "in_cluster"
    assert {"SECRET_KEY", "DATABASE_URL", "CHANNEL_LAYER_URL"} <= _secret_keys()["poolsadmin"]
    # Secrets never sit in the ConfigMap.
    assert not {"SECRET_KEY", "DATABASE_URL", "CHANNEL_LAYER_URL"} & set(config["data"])


# --- RBAC ---------------------------------------------------------------------------------------


def _api_objects() -> dict[str, type]:
    """`self._x = k8s.SomeApi(...)` in the adapter: attribute name -> kubernetes API class."""
    found: dict[str, type] = {}
    for node in ast.walk(ast.parse(ADAPTER.read_text())):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr.endswith("Api")
        ):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    found[target.attr] = getattr(k8s, node.value.func.attr)
    return found


def _request_of(api: type, method: str) -> tuple[str, str]:
    """(HTTP method, resource path) of a client method, read from the generated client."""
    for helper in (f"_{method}_serialize", f"{method}_with_http_info"):
        if hasattr(api, helper):
            source = inspect.getsource(getattr(api, helper))
            path = re.search(r"""resource_path\s*=\s*['"]([^'"]+)|['"](/api[^'"]+)['"]""", source)
            verb = re.search(
                r"""method\s*=\s*['"]([A-Z]+)|['"](GET|POST|PUT|PATCH|DELETE)['"]""", source
            )
            assert path and verb, f"cannot read the request of {api.__name__}.{method}"
            return (verb.group(1) or verb.group(2)), (path.group(1) or path.group(2))
    raise AssertionError(f"{api.__name__} has no method {method}")


def _rule_of(http_method: str, path: str) -> tuple[str, str, str]:
    """(API group, resource, RBAC verb) that a namespaced request needs."""
    match = re.fullmatch(
        r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/\{namespace\}/"
        r"(?P<resource>[^/]+)(?P<item>/\{name\})?(?P<sub>/[^/]+)?",
        path,
    )
    assert match, f"not a namespaced path: {path}"
    resource = match["resource"] + (match["sub"] or "")
    item = match["item"] is not None
    verb = {
        ("GET", False): "list",
        ("GET", True): "get",
        ("POST", False): "create",
        ("PUT", True): "update",
        ("PATCH", True): "patch",
        ("DELETE", True): "delete",
        ("DELETE", False): "deletecollection",
    }[(http_method, item)]
    return match["group"] or "", resource, verb


def adapter_calls() -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the adapter's `self._x.method(...)` calls need."""
    apis = _api_objects()
    needed: set[tuple[str, str, str]] = set()
    for node in ast.walk(ast.parse(ADAPTER.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr in apis
        ):
            api = apis[node.func.value.attr]
            needed.add(_rule_of(*_request_of(api, node.func.attr)))
    return needed


def test_the_adapter_calls_are_found_in_its_source() -> None:
    # The derivation itself: pods and the token Secret, as the adapter's docstrings say.
    assert adapter_calls() == {
        ("", "pods", "list"),
        ("", "pods", "create"),
        ("", "pods", "get"),
        ("", "pods", "delete"),
        ("", "secrets", "create"),
        ("", "secrets", "update"),
    }


def _granted(docs: tuple[dict[str, Any], ...]) -> dict[str, set[tuple[str, str, str]]]:
    """Per namespace, what poolsadmin's ServiceAccount may do there."""
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in _of_kind(docs, "Role")}
    granted: dict[str, set[tuple[str, str, str]]] = {}
    for binding in _of_kind(docs, "RoleBinding"):
        if not any(
            s["kind"] == "ServiceAccount"
            and s["name"] == SERVICE_ACCOUNT
            and s.get("namespace") == APP_NAMESPACE
            for s in binding["subjects"]
        ):
            continue
        namespace = binding["metadata"]["namespace"]
        assert binding["roleRef"]["kind"] == "Role"
        role = roles[(namespace, binding["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "resourceNames" not in rule
            granted.setdefault(namespace, set()).update(
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            )
    return granted


def test_rbac_grants_exactly_the_adapter_calls_in_pool_namespaces_and_nothing_else(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    granted = _granted(manifests)
    assert granted, "no Role is bound to poolsadmin's ServiceAccount"
    assert APP_NAMESPACE not in granted  # no rights in its own namespace
    for namespace, rules in granted.items():
        assert rules == adapter_calls(), namespace
    assert not _of_kind(manifests, "ClusterRole")
    assert not _of_kind(manifests, "ClusterRoleBinding")
    (account,) = _of_kind(manifests, "ServiceAccount")
    assert account["metadata"] == {**account["metadata"], "name": SERVICE_ACCOUNT}
    assert account["metadata"]["namespace"] == APP_NAMESPACE


# --- probes, commands, the image ----------------------------------------------------------------


def _probes(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            yield container[kind]


def _management_command(argv: list[str]) -> str:
    assert argv[:2] == ["python", "manage.py"], argv
    return argv[2]


def test_probes_point_at_real_urls_and_real_management_commands(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    commands = get_commands()
    for where, container in _containers(manifests):
        ports = {port["name"] for port in container.get("ports", [])}
        for probe in _probes(container):
            if "httpGet" in probe:
                path = probe["httpGet"]["path"]
                try:
                    resolve(path)
                except Resolver404:
                    pytest.fail(f"{where}: probe path {path} is not a URL of poolsadmin")
                assert probe["httpGet"]["port"] in ports, where
            else:
                assert _management_command(probe["exec"]["command"]) in commands, where
        if "command" in container:
            assert _management_command(container["command"]) in commands, where


def test_each_long_running_container_is_probed(manifests: tuple[dict[str, Any], ...]) -> None:
    web = dict(_containers(manifests))["poolsadmin-web/web"]
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker = dict(_containers(manifests))["poolsadmin-worker/worker"]
    assert _management_command(worker["livenessProbe"]["exec"]["command"]) == "worker_health"


def test_the_worker_runs_twice_and_may_finish_a_pass_when_stopped(
    manifests: tuple[dict[str, Any], ...],
) -> None:
    (worker,) = [d for d in _of_kind(manifests, "Deployment") if "worker" in d["metadata"]["name"]]
    assert worker["spec"]["replicas"] == 2
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > max(LEASE_TTL_SECONDS, pool_lease_ttl())


def test_every_pod_runs_unprivileged_with_limits(manifests: tuple[dict[str, Any], ...]) -> None:
    for workload, pod in _workloads(manifests):
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_disruption_budgets_select_the_deployments(manifests: tuple[dict[str, Any], ...]) -> None:
    budgets = _of_kind(manifests, "PodDisruptionBudget")
    for deployment in _of_kind(manifests, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(
            budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
            for budget in budgets
        ), deployment["metadata"]["name"]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_image_runs_daphne_on_the_asgi_application_that_exists() -> None:
    (cmd,) = [args for instruction, args in _dockerfile() if instruction == "CMD"]
    argv = json.loads(cmd)
    assert argv[:2] == ["daphne", "--proxy-headers"]
    module_name, _, attribute = argv[-1].partition(":")
    module = __import__(module_name, fromlist=[attribute])
    assert callable(getattr(module, attribute))
    # daphne is a locked dependency installed into the image's venv.
    assert re.search(r"^daphne==", (ROOT / "requirements" / "runtime.lock").read_text(), re.M)


def test_the_image_copies_only_what_exists_and_the_build_context_lets_through() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for instruction, args in _dockerfile():
        if instruction != "COPY" or "--from=" in args:
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


# --- the lock files -----------------------------------------------------------------------------


def _pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a lock file."""
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            pins[name] = (match[2], block.count("--hash=sha256:"))
    return pins


@pytest.mark.parametrize(("lock", "extras"), [("runtime.lock", ()), ("dev.lock", ("dev",))])
def test_the_lock_pins_every_dependency_of_pyproject_with_hashes(
    lock: str, extras: tuple[str, ...]
) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pins = _pins(ROOT / "requirements" / lock)
    assert all(count > 0 for _version, count in pins.values())
    for line in wanted:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not in {lock}: run make lock"
        assert requirement.specifier.contains(pins[name][0]), f"{name} {pins[name][0]}"

"""The fake API server answers like Kubernetes where the adapter and the loops can tell."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.kube.fake_api import ApiStatusError, FakeKubeServer, parse_label_selector

PODS = "/api/v1/namespaces/ci/pods"


def _request(
    server: FakeKubeServer, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _pod(name: str = "", generate_name: str = "", **labels: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": labels}
    if name:
        metadata["name"] = name
    if generate_name:
        metadata["generateName"] = generate_name
    return {"metadata": metadata, "spec": {"containers": [{"name": "agent", "image": "img"}]}}


def test_a_second_pod_with_the_same_name_is_a_409_already_exists_status(
    fake_kube: FakeKubeServer,
) -> None:
    assert _request(fake_kube, "POST", PODS, _pod("agent-1"))[0] == 201

    code, body = _request(fake_kube, "POST", PODS, _pod("agent-1"))

    assert code == 409
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "agent-1" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "agent-1", "kind": "pods"},
        "code": 409,
    }


def test_a_created_pod_is_a_v1_pod_with_server_set_metadata(fake_kube: FakeKubeServer) -> None:
    code, pod = _request(fake_kube, "POST", PODS, _pod(generate_name="web-", app="web"))

    assert code == 201
    assert (pod["kind"], pod["apiVersion"]) == ("Pod", "v1")
    meta = pod["metadata"]
    assert meta["name"].startswith("web-") and len(meta["name"]) == 9
    assert meta["namespace"] == "ci"
    assert meta["labels"] == {"app": "web"}
    assert {"uid", "resourceVersion", "creationTimestamp"} <= set(meta)
    assert pod["spec"] == _pod()["spec"]
    assert pod["status"] == {"phase": "Pending"}


def test_a_missing_pod_is_a_404_not_found_status(fake_kube: FakeKubeServer) -> None:
    for method in ("GET", "DELETE"):
        code, body = _request(fake_kube, method, f"{PODS}/nope")
        assert code == 404
        assert (body["reason"], body["message"]) == ("NotFound", 'pods "nope" not found')


def test_an_unknown_path_is_a_404_and_an_unknown_method_a_405(fake_kube: FakeKubeServer) -> None:
    assert _request(fake_kube, "GET", "/api/v1/nodes")[0] == 404
    assert _request(fake_kube, "PUT", PODS, _pod("x"))[0] == 405


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", ["a", "b", "c"]),
        ("pool=p1", ["a", "b"]),
        ("pool==p1,tier=x", ["a"]),
        ("pool!=p1", ["c"]),
        ("tier!=x", ["b", "c"]),
    ],
)
def test_listing_filters_by_equality_based_label_selectors(
    fake_kube: FakeKubeServer, selector: str, expected: list[str]
) -> None:
    fake_kube.add_pod("ci", "a", labels={"pool": "p1", "tier": "x"})
    fake_kube.add_pod("ci", "b", labels={"pool": "p1"})
    fake_kube.add_pod("ci", "c", labels={"pool": "p2"})
    fake_kube.add_pod("other", "d", labels={"pool": "p1"})

    code, body = _request(fake_kube, "GET", f"{PODS}?labelSelector={selector}")

    assert code == 200
    assert body["kind"] == "PodList"
    assert [pod["metadata"]["name"] for pod in body["items"]] == expected


def test_set_based_selectors_are_refused_rather_than_ignored() -> None:
    with pytest.raises(ApiStatusError, match="unable to parse requirement"):
        parse_label_selector("pool in (p1,p2)")


@pytest.mark.parametrize(
    ("pod", "field"),
    [
        (_pod("Not_A_Name"), "metadata.name"),
        (_pod(), "metadata.name"),
        (_pod("ok", pool="x" * 64), "metadata.labels"),
        ({"metadata": {"name": "ok"}, "spec": {"containers": []}}, "spec.containers"),
    ],
)
def test_an_invalid_pod_is_a_422(fake_kube: FakeKubeServer, pod: Any, field: str) -> None:
    code, body = _request(fake_kube, "POST", PODS, pod)

    assert (code, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == field


def test_generate_name_is_cut_so_the_name_fits_63_characters(fake_kube: FakeKubeServer) -> None:
    code, pod = _request(fake_kube, "POST", PODS, _pod(generate_name="a" * 80))

    assert code == 201
    assert len(pod["metadata"]["name"]) == 63


def test_injected_failures_and_delays_are_used_up(fake_kube: FakeKubeServer) -> None:
    fake_kube.fail_next(2, status=503)

    assert [_request(fake_kube, "GET", PODS)[0] for _ in range(3)] == [503, 503, 200]
    assert [(r.method, r.path) for r in fake_kube.requests_log] == [("GET", PODS)] * 3


def test_phase_controls_refuse_what_kubernetes_would_not_have(fake_kube: FakeKubeServer) -> None:
    fake_kube.add_pod("ci", "a")
    fake_kube.add_pod("other", "a")

    with pytest.raises(ValueError, match="not a pod phase"):
        fake_kube.set_phase("a", "Done", namespace="ci")
    with pytest.raises(ValueError, match="several namespaces"):
        fake_kube.set_phase("a", "Running")
    with pytest.raises(KeyError):
        fake_kube.set_phase("b", "Running")
    fake_kube.set_phase("a", "Succeeded", namespace="other")
    pod = fake_kube.pod("a", namespace="other")
    assert pod is not None
    assert pod["status"]["phase"] == "Succeeded"
    assert fake_kube.errors == []

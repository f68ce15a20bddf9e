"""`manage.py pool_token create`: a token printed once, or written into the agents' Secret and
never shown or logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from poolsadmin.kube.adapter import KubeConfig
from poolsadmin.pools.models import PoolToken
from poolsadmin.pools.services import pool_token_authenticate
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_pool
from tests.worker.kube_scenarios import NAMESPACE, make_k8s_pool


@pytest.fixture
def cluster(fake_kube: FakeKubeServer, settings: Any) -> FakeKubeServer:
    settings.KUBE_CONFIG = KubeConfig(mode="url", url=fake_kube.url, timeout_seconds=5.0)
    return fake_kube


def _token_in(server: FakeKubeServer, name: str, namespace: str = NAMESPACE) -> str:
    token = server.secret_value(name, namespace, "token")
    assert token is not None, f"no token in secret {namespace}/{name}"
    return token


@pytest.mark.django_db
def test_create_prints_a_working_token_once(capsys: pytest.CaptureFixture[str]) -> None:
    pool = make_pool()
    call_command("pool_token", "create", "--pool", pool.pool_id, "--name", "build")

    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"token build for {pool.pool_id} (shown once):"
    assert pool_token_authenticate(secret=out[1]).pool_id == pool.pool_id


@pytest.mark.django_db
def test_k8s_secret_writes_the_token_where_agent_pods_read_it_and_never_shows_it(
    cluster: FakeKubeServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_k8s_pool()
    caplog.set_level(logging.DEBUG)

    call_command("pool_token", "create", "--pool", pool.pool_id, "--k8s-secret")

    name = f"poolsadmin-agent-token-{pool.pool_id}"  # POOLSADMIN_AGENT_TOKEN_SECRET
    token = _token_in(cluster, name)
    assert pool_token_authenticate(secret=token).pool_id == pool.pool_id
    captured = capsys.readouterr()
    assert f"secret {NAMESPACE}/{name} created" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert token not in text
        assert "apt_" not in text


@pytest.mark.django_db
def test_k8s_secret_with_a_name_and_namespace_replaces_an_existing_secret(
    cluster: FakeKubeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = make_k8s_pool()
    args = ["pool_token", "create", "--pool", pool.pool_id]
    call_command(*args, "--k8s-secret", "agents", "--namespace", "other")
    first = _token_in(cluster, "agents", "other")
    call_command(*args, "--k8s-secret", "agents", "--namespace", "other")

    second = _token_in(cluster, "agents", "other")
    assert second != first
    captured = capsys.readouterr()
    assert "secret other/agents replaced" in captured.out
    assert "the autoscaler's pods read" in captured.err
    assert PoolToken.objects.filter(pool=pool, revoked_at__isnull=True).count() == 2


@pytest.mark.django_db
def test_a_secret_the_cluster_refuses_leaves_no_usable_token(cluster: FakeKubeServer) -> None:
    pool = make_k8s_pool()
    cluster.fail_next(1, status=403, method="POST")

    with pytest.raises(CommandError, match=r"could not write secret .* was revoked"):
        call_command("pool_token", "create", "--pool", pool.pool_id, "--k8s-secret")

    (token,) = PoolToken.objects.filter(pool=pool)
    assert token.revoked_at is not None


@pytest.mark.django_db
def test_k8s_secret_of_a_pool_without_namespace_needs_one() -> None:
    pool = make_pool()
    with pytest.raises(CommandError, match="has no namespace: pass --namespace"):
        call_command("pool_token", "create", "--pool", pool.pool_id, "--k8s-secret")
    assert not PoolToken.objects.exists()


@pytest.mark.django_db
def test_an_unknown_pool_is_refused() -> None:
    with pytest.raises(CommandError, match="does not exist"):
        call_command("pool_token", "create", "--pool", "pool-0000000000000000")

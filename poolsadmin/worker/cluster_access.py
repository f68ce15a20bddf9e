"""The worker's one Kubernetes client, built lazily from the environment (KUBE_*), and only
when a k8s pool exists: a worker serving static pools never needs a cluster."""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from poolsadmin.kube.adapter import KubeApi, KubeClient, KubeError
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool, PoolType

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_client: KubeClient | None = None
_override: KubeApi | None = None


def _shared_client() -> KubeClient:
    """The process's one client, built on first use (ImproperlyConfigured, KubeError)."""
    global _client
    with _lock:
        if _client is None:
            _client = KubeClient(settings.KUBE_CONFIG)
        return _client


def kube_for_pool(pool: AgentPool) -> KubeApi | None:
    """The client for a k8s pool, or None (static pool, or no usable cluster config: the
    error is logged and the loops keep serving the other pools)."""
    if pool.pool_type != PoolType.K8S:
        return None
    if _override is not None:
        return _override
    try:
        return _shared_client()
    except (ImproperlyConfigured, KubeError) as exc:
        logger.error(
            "no Kubernetes client for pool %s: %s",
            pool.pool_id,
            exc,
            extra=log_ids(pool=pool.pool_id),
        )
        return None


def kube_client_check() -> None:
    """Build the client now, if a k8s pool exists: a configuration that can never work (no
    service account in the pod, a kubeconfig that does not exist) stops the worker's start-up
    with ImproperlyConfigured, instead of being logged at every pass while no k8s pool is ever
    synced. A cluster that does not answer yet is no reason not to start: KubeError is left to
    the passes, which retry."""
    if _override is not None or not AgentPool.objects.filter(pool_type=PoolType.K8S).exists():
        return
    try:
        _shared_client()
    except KubeError as exc:
        logger.warning("the Kubernetes API does not answer yet: %s", exc)


def kube_override(client: KubeApi | None) -> None:
    """Use `client` for every k8s pool (the demo's in-process fake cluster, tests)."""
    global _override
    _override = client

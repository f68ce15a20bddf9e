"""Fixtures for code that talks to a cluster: a fake API server and a client bound to it.

Other test packages (the reconciler and autoscaler tests) can start their own server with
`tests.kube.fake_api.start_fake_kube()`, or use these fixtures once they move to the root
conftest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from poolsadmin.kube.adapter import KubeClient, KubeConfig
from tests.kube.fake_api import FakeKubeServer, start_fake_kube


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeServer]:
    with start_fake_kube() as server:
        yield server


@pytest.fixture
def kube_client(fake_kube: FakeKubeServer) -> Iterator[KubeClient]:
    # Generous for a loaded CI machine; the timeout tests build their own, shorter one.
    with KubeClient(KubeConfig(mode="url", url=fake_kube.url, timeout_seconds=5.0)) as client:
        yield client

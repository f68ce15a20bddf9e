from __future__ import annotations

from collections.abc import Iterator

import pytest

from poolsadmin.kube.adapter import KubeClient, KubeConfig
from tests.kube.fake_api import FakeKubeServer, start_fake_kube


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeServer]:
    with start_fake_kube(auto_run=True) as server:
        yield server


@pytest.fixture
def kube_client(fake_kube: FakeKubeServer) -> Iterator[KubeClient]:
    with KubeClient(KubeConfig(mode="url", url=fake_kube.url, timeout_seconds=5.0)) as client:
        yield client

"""The fake Kubernetes API server moved to `poolsadmin.kube.fake_api` (the demo runs it too);
this name stays for the tests that import it from here."""

from poolsadmin.kube.fake_api import *  # noqa: F403
from poolsadmin.kube.fake_api import (
    PHASES,
    ApiStatusError,
    FakeKubeServer,
    LoggedRequest,
    parse_label_selector,
    start_fake_kube,
    status_body,
)

__all__ = [
    "PHASES",
    "ApiStatusError",
    "FakeKubeServer",
    "LoggedRequest",
    "parse_label_selector",
    "start_fake_kube",
    "status_body",
]

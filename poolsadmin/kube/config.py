"""Kubernetes settings from the environment (KUBE_*), without importing `kubernetes`: settings.py
reads them at start-up, so a bad value stops every process before it serves, naming the
variable (poolsadmin/kube/adapter.py is the one module that talks to a cluster)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

from django.core.exceptions import ImproperlyConfigured

KubeMode = Literal["in_cluster", "kubeconfig", "url"]
KUBE_MODES: tuple[str, ...] = get_args(KubeMode)


@dataclass(frozen=True)
class KubeConfig:
    mode: KubeMode
    url: str = ""
    # repr=False: a config is logged and shown in tracebacks; the token must not be.
    token: str = field(default="", repr=False)
    verify_ssl: bool = True
    kubeconfig_path: str = ""
    context: str = ""
    timeout_seconds: float = 10.0


# --- configuration from the environment -----------------------------------------------------


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={env[name]!r} is not a boolean (use true/false, 1/0).")


def kube_config_from_env(environ: Mapping[str, str] | None = None) -> KubeConfig:
    """Read KUBE_* (see .env.example). Bad values fail loudly, naming the variable.

    KUBE_MODE defaults to `in_cluster`, the production deployment; it is never guessed from a
    developer's ~/.kube/config, which could point at a real cluster. Variables that only mean
    something in another mode are refused rather than silently ignored.
    """
    env = os.environ if environ is None else environ
    mode = env.get("KUBE_MODE", "").strip() or "in_cluster"
    if mode not in KUBE_MODES:
        raise ImproperlyConfigured(f"KUBE_MODE={mode!r} is not one of {', '.join(KUBE_MODES)}.")
    url = env.get("KUBE_API_URL", "").strip()
    token = env.get("KUBE_TOKEN", "").strip()
    context = env.get("KUBE_CONTEXT", "").strip()
    if mode == "url":
        if not re.match(r"^https?://[^/\s]+", url):
            raise ImproperlyConfigured(
                f"KUBE_API_URL={url!r} must be an http:// or https:// URL when KUBE_MODE=url."
            )
    else:
        for name in ("KUBE_API_URL", "KUBE_TOKEN", "KUBE_VERIFY_SSL"):
            if env.get(name, "").strip():
                raise ImproperlyConfigured(f"{name} is only used with KUBE_MODE=url.")
    if mode != "kubeconfig" and context:
        raise ImproperlyConfigured("KUBE_CONTEXT is only used with KUBE_MODE=kubeconfig.")

    raw_timeout = env.get("KUBE_TIMEOUT_SECONDS", "").strip()
    timeout = 10.0
    if raw_timeout:
        try:
            timeout = float(raw_timeout)
        except ValueError:
            raise ImproperlyConfigured(
                f"KUBE_TIMEOUT_SECONDS={raw_timeout!r} is not a number."
            ) from None
        # A loop step must never hang on the cluster: no zero, negative or infinite timeout.
        if not 0 < timeout <= 300:
            raise ImproperlyConfigured(
                f"KUBE_TIMEOUT_SECONDS={raw_timeout} must be > 0 and <= 300."
            )

    return KubeConfig(
        mode=cast(KubeMode, mode),  # checked against KUBE_MODES above
        url=url,
        token=token,
        verify_ssl=_env_bool(env, "KUBE_VERIFY_SSL", default=True),
        # KUBECONFIG keeps its standard meaning (one path or several joined by os.pathsep);
        # empty means ~/.kube/config.
        kubeconfig_path=env.get("KUBECONFIG", "").strip(),
        context=context,
        timeout_seconds=timeout,
    )

from __future__ import annotations

from django.apps import AppConfig


class AutoscalerConfig(AppConfig):
    name = "poolsadmin.autoscaler"
    label = "autoscaler"

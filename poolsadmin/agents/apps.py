from __future__ import annotations

from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "poolsadmin.agents"
    label = "agents"

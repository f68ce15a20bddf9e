from __future__ import annotations

from typing import Any

# The per-pool consumer arrives with the live dashboard; the ASGI router is wired already.
websocket_urlpatterns: list[Any] = []

from __future__ import annotations

from django.urls import URLPattern, path

from poolsadmin.realtime.consumers import PoolConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/pools/<str:pool_id>/", PoolConsumer.as_asgi(), name="ws-pools-detail"),
]

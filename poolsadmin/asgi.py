"""ASGI entry point: HTTP through Django, WebSockets through Channels (live dashboard)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsadmin.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from poolsadmin.agents.liveness import hearing_keeper_start  # noqa: E402
from poolsadmin.realtime.routing import websocket_urlpatterns  # noqa: E402

# A process serving the agent API records that it is listening (SPEC 5: silence during an
# outage of poolsadmin is not an agent's fault).
if settings.POOLSADMIN_HEARING_KEEPER:
    hearing_keeper_start()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

"""ASGI entry point: HTTP through Django's WSGI handler in a pool of threads (lib/http_app.py),
WebSockets through Channels (live dashboard)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsadmin.settings")

import django

django.setup(set_prefix=False)  # as get_wsgi_application does, before the imports below

from poolsadmin.health.middleware import PROBES  # noqa: E402
from poolsadmin.lib.http_app import http_application  # noqa: E402

http_app = http_application(exempt=PROBES)  # a saturated process still answers its probes

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
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

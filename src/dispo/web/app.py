"""dispod's one aiohttp application: the REST API (/v1), the dashboard (/ui/TOKEN/), every session's viewer
(/viewer/ID/TOKEN/) and automation endpoint (/automation/ID/TOKEN/cdp), behind the guards of guard.py."""

from __future__ import annotations

from aiohttp import web

from dispo.web import api, dashboard
from dispo.web.guard import CLUSTER_SECRET, CONNECTIONS, MIDDLEWARES, TOKEN, Connections, Limits, security_headers
from dispo.web.service import Service


def build_app(service: Service, limits: Limits, cluster_secret: str = "") -> web.Application:
    app = web.Application(client_max_size=limits.max_body, middlewares=MIDDLEWARES)
    app[api.SERVICE] = service
    app[TOKEN] = service.token
    if cluster_secret:  # a cluster's node: its gateway's requests carry this secret (dispo/cluster/)
        app[CLUSTER_SECRET] = cluster_secret
    app[CONNECTIONS] = Connections()
    app.on_response_prepare.append(security_headers)
    app.add_routes(api.routes())
    app.add_routes(dashboard.routes())
    app.add_routes(service.viewers.routes())
    app.add_routes(service.automation.routes())
    app.on_shutdown.append(service.automation.close)
    return app

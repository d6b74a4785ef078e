"""dispod's web side: one aiohttp server for the REST API, the event stream, the dashboard and the viewers
(and the viewer that `dispo run` serves itself).

    app.py        the application: routes and middlewares
    service.py    the state behind the routes (the Runtime, the token, reclaimed sessions)
    api.py        /v1: sessions, profiles, images, health, the OpenAPI document
    sse.py        /v1/events: runtime events as Server-Sent Events
    viewer.py     the web viewer of one session: page, noVNC's files, VNC bridge, status; WebViewer
    viewers.py    the runtime's ViewerHost: dispo run's (a WebViewer each), dispod's (/viewer/ID/TOKEN/)
    dashboard.py  /ui/TOKEN/: the dashboard page
    guard.py      connection cap, header timeout, Host/Origin/token checks, security headers
    problems.py   errors as application/problem+json, mapped once
    openapi.py    the OpenAPI 3.1 document
    server.py     listening on the unix socket and TCP
"""

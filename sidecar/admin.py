"""The admin application on `admin.listen`: health, readiness (and, under /admin/, the operator API)."""

from __future__ import annotations

import time

from aiohttp import web

from sidecar.app import RUN_WORKER, RUNTIME
from sidecar.telemetry import metrics_handler


def create_admin_app(main: web.Application) -> web.Application:
    admin = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        runtime = main.get(RUNTIME)
        if runtime is None:
            return web.json_response({"ready": False, "reason": "starting"}, status=503)
        if not await runtime.store.ping():
            return web.json_response({"ready": False, "reason": "store_unavailable"}, status=503)
        stale = time.monotonic() - runtime.worker.last_beat
        if main[RUN_WORKER] and stale > 60:
            return web.json_response({"ready": False, "reason": "worker_stalled"}, status=503)
        return web.json_response({"ready": True})

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics_handler(main))
    return admin

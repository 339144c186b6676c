"""Typed application keys (aiohttp ``AppKey``)."""

from __future__ import annotations

from aiohttp import web

from shared.services import Services

SERVICES = web.AppKey("services", Services)
MAX_BODY = web.AppKey("max_body_bytes", int)

"""sidecar.httpsite.bind over real loopback sockets."""

from __future__ import annotations

import logging
import socket

import aiohttp
import pytest
from aiohttp import web

from sidecar import httpsite
from sidecar.config import HostPort

log = logging.getLogger("test")


async def test_binds_a_free_port_and_serves() -> None:
    app = web.Application()
    app.router.add_get("/", lambda _r: web.Response(text="hi"))
    runner = web.AppRunner(app)
    port = await httpsite.bind(runner, HostPort("127.0.0.1", 0), "test", log)
    try:
        assert port > 0
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
            assert await r.text() == "hi"
    finally:
        await runner.cleanup()


async def test_a_taken_port_raises_and_leaves_nothing_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = web.AppRunner(web.Application())
        with pytest.raises(OSError):
            await httpsite.bind(runner, HostPort("127.0.0.1", port), "test", log)
        assert runner.server is None  # cleaned up

"""Binding the aiohttp servers of the control side (admin, probe port): one way to listen and report."""

from __future__ import annotations

import logging

from aiohttp import web

from .config import HostPort


async def bind(runner: web.BaseRunner, listen: HostPort, name: str, log: logging.Logger) -> int:
    """Set up `runner` and listen on `listen`; return the bound port (listen port 0 picks a free one).

    On a bind error the runner is cleaned up and the OSError propagates (the caller reports it)."""
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    port = int(addresses[0][1]) if addresses else listen.port
    log.info("%s listening on %s", name, HostPort(listen.host, port))
    return port

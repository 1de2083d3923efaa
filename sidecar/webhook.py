"""The mutating admission webhook (edge): HTTPS AdmissionReview v1 around `inject.inject` (pure).

* `POST /mutate`: AdmissionReview `admission.k8s.io/v1` in, the same apiVersion out, `uid` echoed
  (kubernetes-notes §2.1). Pod CREATE requests get `patchType: JSONPatch` + base64 patch (the diff of
  pod and mutated pod); anything else is allowed unchanged. A pod whose `spiffe-sidecar.io/` annotations
  do not compile is refused (`allowed: false`, code 400) with a message naming the annotation and line.
  The namespace comes from `request.namespace`, never from the object (kubernetes#88282).
* `GET /healthz`: liveness/readiness of the webhook itself.
* TLS: the serving cert/key files are polled; when the mounted Secret changes (`..data` swap, cert-manager
  rotation) a fresh SSLContext is built and new handshakes pick it up through the SNI callback. A live
  context is never mutated; a bad new pair is logged and the old one kept.
* Every request runs under a deadline (the API server's own timeoutSeconds is at most 30 s).

aiohttp, jsonpatch and `inject` are imported where they are used, not with this module: the command line
imports it to describe `webhook`'s options for every command, `spiffe-sidecar run` included, and a running
sidecar must not carry the webhook's server (issue 11: idle RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from .config import HostPort, parse_host_port
from .errors import ConfigError, Problem, SidecarError

if TYPE_CHECKING:
    from aiohttp import web

    from .inject import InjectSettings

__all__ = [
    "CertReloader",
    "WebhookServer",
    "add_webhook_arguments",
    "review_response",
    "webhook_main",
]

log = logging.getLogger("spiffe_sidecar.webhook")

ADMISSION_API: Final = "admission.k8s.io/v1"
MAX_BODY: Final = 8 * 1024 * 1024  # the API server caps request bodies at 3 MiB; pods are far smaller
_MAX_WARNING: Final = 120  # longer warnings may be truncated by the API server (notes §2.1)
_MAX_MESSAGE: Final = 2000


class BadReview(SidecarError):
    """A request body that is not an AdmissionReview v1 (answered with HTTP 400)."""


def review_response(body: Any, settings: InjectSettings) -> dict[str, Any]:
    """The AdmissionReview response for a decoded request body (pure; raises BadReview)."""
    import jsonpatch

    from .inject import inject

    if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
        raise BadReview("expected an AdmissionReview")
    if body.get("apiVersion") != ADMISSION_API:
        raise BadReview(f"expected apiVersion {ADMISSION_API} (admissionReviewVersions: [v1])")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid is required")
    uid: str = request["uid"]
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    envelope = {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}

    kind = request.get("kind") or {}
    resource = request.get("resource") or {}
    pod = request.get("object")
    if (
        request.get("operation") != "CREATE"
        or not isinstance(kind, dict)
        or kind.get("kind") != "Pod"
        or not isinstance(resource, dict)
        or resource.get("resource") != "pods"
        or request.get("subResource")
        or not isinstance(pod, dict)
    ):
        return envelope  # not ours: allow unchanged (the webhook config only sends pod CREATE anyway)
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise BadReview("request.namespace is required for pods")
    try:
        result = inject(pod, namespace=namespace, settings=settings)
    except ConfigError as exc:
        message = "spiffe-sidecar: pod rejected: " + "; ".join(str(p) for p in exc.problems)
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        response["allowed"] = False
        response["status"] = {"status": "Failure", "code": 400, "reason": "BadRequest", "message": message}
        return envelope
    if result.injected:
        ops = jsonpatch.make_patch(pod, result.pod).patch
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode("ascii")
    if result.warnings:
        response["warnings"] = [w if len(w) <= _MAX_WARNING else w[: _MAX_WARNING - 3] + "..." for w in result.warnings]
    return envelope


def _describe(request: Mapping[str, Any]) -> str:
    obj = request.get("object") if isinstance(request.get("object"), dict) else {}
    meta = obj.get("metadata") if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = meta.get("name") or (str(meta.get("generateName") or "") + "*")
    return f"{request.get('namespace')}/{name}"


# ---------------------------------------------------------------------------------------------------------
# TLS with reload


def _load_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _fingerprint(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)  # follows the ..data symlink: inode and mtime change on every swap
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertReloader:
    """Holds the newest serving context; `check()` reloads when the files changed (keeps the old on error)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert = cert
        self._key = key
        self._seen = _fingerprint(cert, key)
        self.current = _load_context(cert, key)
        # The listener's context: it hands each handshake to the newest context via the SNI callback
        # (called for every ClientHello, with or without SNI). Swapping a reference, never mutating.
        self.listener = _load_context(cert, key)
        self.listener.sni_callback = self._pick
        self.reloads = 0

    def _pick(self, sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self.current is not _ctx:
            sslobj.context = self.current
        return None

    def check(self) -> bool:
        """Reload if the cert or key changed; True when a new context was installed."""
        try:
            seen = _fingerprint(self._cert, self._key)
        except OSError as exc:
            log.warning("serving certificate not readable, keeping the current one: %s", exc.strerror or exc)
            return False
        if seen == self._seen:
            return False
        try:
            ctx = _load_context(self._cert, self._key)
        except (OSError, ssl.SSLError) as exc:
            # Mid-rotation (cert and key written separately) or a bad pair: retry on the next tick.
            log.warning("new serving certificate not loaded, keeping the current one: %s", exc)
            return False
        self._seen = seen
        self.current = ctx
        self.reloads += 1
        log.info("serving certificate reloaded from %s", self._cert)
        return True


# ---------------------------------------------------------------------------------------------------------
# Server


class WebhookServer:
    """aiohttp HTTPS server for /mutate and /healthz."""

    def __init__(
        self,
        listen: HostPort,
        *,
        cert: Path,
        key: Path,
        settings: InjectSettings,
        request_timeout: float = 8.0,
        reload_interval: float = 2.0,
        review: Callable[[Any, InjectSettings], dict[str, Any]] = review_response,
    ) -> None:
        from aiohttp import web

        self._listen = listen
        self._certs = CertReloader(cert, key)
        self._settings = settings
        self._timeout = request_timeout
        self._reload_interval = reload_interval
        self._review = review
        self._runner: web.AppRunner | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self.port: int | None = None
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        self._app = app

    @property
    def certs(self) -> CertReloader:
        return self._certs

    async def start(self) -> int:
        from aiohttp import web

        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(
            runner, self._listen.host, self._listen.port, ssl_context=self._certs.listener, reuse_address=True
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self._listen.port
        self._reload_task = asyncio.create_task(self._reload_loop(), name="webhook-cert-reload")
        log.info("webhook listening on %s (https)", HostPort(self._listen.host, self.port))
        return self.port

    async def stop(self) -> None:
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
            self._reload_task = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            async with asyncio.timeout(10):
                await runner.cleanup()

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            self._certs.check()

    async def _healthz(self, _request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(text="ok\n")

    async def _mutate(self, request: web.Request) -> web.Response:
        from aiohttp import web

        try:
            async with asyncio.timeout(self._timeout):
                if request.content_type != "application/json":
                    return web.Response(status=415, text="expected Content-Type: application/json\n")
                raw = await request.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    return web.Response(status=400, text="body is not JSON\n")
                try:
                    out = self._review(body, self._settings)
                except BadReview as exc:
                    return web.Response(status=400, text=f"{exc}\n")
        except TimeoutError:
            log.warning("admission request timed out after %.1fs", self._timeout)
            return web.Response(status=504, text="timed out\n")
        resp = out["response"]
        req = body["request"]
        if not resp["allowed"]:
            log.info("rejected pod %s (uid %s): %s", _describe(req), resp["uid"], resp["status"]["message"])
        else:
            log.info(
                "admitted pod %s (uid %s)%s", _describe(req), resp["uid"], " with patch" if "patch" in resp else ""
            )
        return web.json_response(out)


# ---------------------------------------------------------------------------------------------------------
# CLI entry (`spiffe-sidecar webhook ...`, hooked into cli.py by the lead)


def add_webhook_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert", required=True, type=Path, metavar="FILE", help="serving certificate chain (PEM)")
    p.add_argument("--key", required=True, type=Path, metavar="FILE", help="serving private key (PEM)")
    p.add_argument("--listen", default="0.0.0.0:9443", metavar="HOST:PORT", help="default 0.0.0.0:9443")
    p.add_argument("--settings", type=Path, metavar="FILE", help="injector settings YAML (the chart's ConfigMap)")
    p.add_argument("--image", help="sidecar image (overrides the settings file)")
    p.add_argument("--request-timeout", type=float, default=8.0, metavar="SECONDS",
                   help="deadline for one AdmissionReview (default 8; keep below the webhook's timeoutSeconds)")
    p.add_argument("--reload-interval", type=float, default=2.0, metavar="SECONDS",
                   help="how often the cert, key and settings files are checked for changes (default 2)")


def load_inject_settings(path: Path | None, image: str | None = None) -> InjectSettings:
    """Injector settings from a YAML file (ConfigMap) plus an optional image override; ConfigError."""
    from .inject import InjectSettings

    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror or exc}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([Problem(str(path), f"invalid YAML: {exc}")]) from None
    settings = InjectSettings.from_mapping(data, str(path or "settings"))
    if image:
        settings = InjectSettings.from_mapping({**(data or {}), "image": image}, "--image")
    return settings


def webhook_main(args: argparse.Namespace) -> int:
    """Run the webhook until SIGTERM/SIGINT. Returns an exit status (2: bad settings, 1: cannot serve)."""
    try:
        settings = load_inject_settings(args.settings, args.image)
        listen = parse_host_port(args.listen, allow_zero_port=True)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"error: {p}", file=sys.stderr, flush=True)
        return 2
    except ValueError as exc:
        print(f"error: --listen: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return asyncio.run(_serve(listen, args, settings))
    except (OSError, ssl.SSLError) as exc:
        print(f"error: webhook: {exc}", file=sys.stderr, flush=True)
        return 1


async def _serve(listen: HostPort, args: argparse.Namespace, settings: InjectSettings) -> int:
    server = WebhookServer(
        listen,
        cert=args.cert,
        key=args.key,
        settings=settings,
        request_timeout=args.request_timeout,
        reload_interval=args.reload_interval,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"webhook listening on https://{HostPort(listen.host, server.port or listen.port)}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0

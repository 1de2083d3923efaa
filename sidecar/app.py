"""Composition root: the only module that wires the edges together (source -> TLS, policy -> inbound, ...).

Lifecycle of `run()`:
1. build metrics, audit log, SVID source, TLS contexts, policy holder; start the admin server (readyz 503)
   and, when configured, the read-only /metrics listener for Prometheus;
2. wait for the first X.509-SVID (deadline `first_svid_timeout`, progress logged every few seconds);
3. bind every configured listener (inbound, outbound ports, outbound proxy), log one "ready" line;
   readyz turns 200 only then (an outbound-only sidecar, a pure client, has no inbound listener);
4. until SIGTERM/SIGINT: apply every new X509Context (rotation), reload `policy_file` when it changes
   (a bad update keeps the last good policy), flush audit drop summaries;
5. on SIGTERM/SIGINT: readyz goes 503, the listener stops accepting and drains in-flight requests up to
   `timeouts.drain`; exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .admin import AdminServer, MetricsServer, config_view
from .annotations import PodRuntime, load_annotations_policy
from .audit import AuditLog, open_writer
from .bypass import BypassCheck, BypassMonitor
from .config import HostPort, ListenerMode, PemSourceSettings, Settings, WorkloadApiSettings, load_policy
from .errors import ConfigError, SourceError
from .hints import policy_warnings
from .inbound import InboundServer, PolicyRef
from .jwtsource import JwtBundleHolder, JwtBundles, JwtSvidFetcher
from .memory import configure as configure_allocator
from .memory import reclaimer
from .metrics import Metrics
from .outbound import OutboundServer, build_routes
from .policy import Policy
from .probes import ProbeServer
from .sources import PemFileSource, SourceEvent, WorkloadApiSource
from .svid import X509Context
from .tls import TlsContexts

__all__ = ["ENV_POLICY_POLL_INTERVAL", "FIRST_SVID_TIMEOUT", "POLICY_POLL_INTERVAL", "PolicyWatcher", "run"]

log = logging.getLogger("spiffe_sidecar.app")

FIRST_SVID_TIMEOUT = 60.0  # a pod without an SVID after a minute is misconfigured (no entry, no socket)
POLICY_POLL_INTERVAL = 1.0  # downward API files change by a symlink swap; polling is the portable way
# Overrides POLICY_POLL_INTERVAL (seconds) when `run` is not given one: tests and demos make a reload show in
# milliseconds. An environment knob rather than a config key: production has no reason to change it.
ENV_POLICY_POLL_INTERVAL = "SPIFFE_SIDECAR_POLICY_POLL_INTERVAL"
_PROGRESS_EVERY = 5.0
_AUDIT_FLUSH_EVERY = 1.0
_STOP_GRACE = 5.0  # on top of timeouts.drain, for closing the admin server and cancelling tasks


@dataclass(slots=True)
class _State:
    context: X509Context | None = None
    listeners_bound: bool = False
    exit_code: int = 0
    exit_reason: str = ""

    def fail(self, code: int, reason: str, stop: asyncio.Event) -> None:
        if not self.exit_code:
            self.exit_code, self.exit_reason = code, reason
        stop.set()


class PolicyWatcher:
    """Polls a policy file (content hash) and swaps `PolicyRef.policy` when a new version compiles.

    A version that does not compile is logged (every problem, one line each) and counted as
    `policy_reloads{result="error"}`; the last good policy stays in force. Each distinct content is
    judged once, so a bad file is not re-logged every second.
    """

    def __init__(
        self,
        path: Path,
        ref: PolicyRef,
        metrics: Metrics,
        initial_text: str | None = None,
        load: Callable[[str, str], Policy] = load_policy,  # (text, source): YAML file or downward API file
    ) -> None:
        self._path = path
        self._load = load
        self._ref = ref
        self._metrics = metrics
        self._seen = None if initial_text is None else _digest(initial_text.encode())

    def _read(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except OSError as exc:
            # The kubelet's symlink swap can briefly leave no file; keep the last good policy.
            log.debug("policy file %s unreadable: %s", self._path, exc)
            return None

    async def check_once(self) -> bool | None:
        """Reload if the content changed: True (swapped), False (rejected), None (unchanged/unreadable)."""
        async with asyncio.timeout(10):
            data = await asyncio.to_thread(self._read)
        if data is None:
            return None
        digest = _digest(data)
        if digest == self._seen:
            return None
        self._seen = digest
        try:
            policy = self._load(data.decode("utf-8"), str(self._path))
        except UnicodeDecodeError:
            log.error("policy reload rejected, keeping the last good policy: %s: not UTF-8", self._path)
            self._metrics.policy_reloads.labels(result="error").inc()
            return False
        except ConfigError as exc:
            log.error("policy reload rejected (%d problems), keeping the last good policy", len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            self._metrics.policy_reloads.labels(result="error").inc()
            return False
        self._ref.policy = policy  # one reference assignment: each request sees the old or the new policy
        self._metrics.policy_reloads.labels(result="ok").inc()
        log.info("policy reloaded from %s (%s)", self._path, _rule_summary(policy))
        for warning in policy_warnings(policy):
            log.warning("%s", warning)
        return True

    async def run(self, interval: float = POLICY_POLL_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_once()
            except TimeoutError:
                log.warning("policy file %s: read timed out", self._path)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _policy_poll_interval(environ: Mapping[str, str]) -> float | None:
    """$SPIFFE_SIDECAR_POLICY_POLL_INTERVAL in seconds (POLICY_POLL_INTERVAL when unset); None when invalid."""
    raw = environ.get(ENV_POLICY_POLL_INTERVAL)
    if raw is None:
        return POLICY_POLL_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0.001 <= value <= 3600 else None


def _rule_summary(policy: Policy) -> str:
    rules = getattr(policy, "rules", None)
    if rules is not None:
        return f"{len(rules)} rules"
    return f"{len(policy.describe())} lines"


def _make_source(
    settings: Settings, on_event: Callable[[SourceEvent], None]
) -> WorkloadApiSource | PemFileSource:
    src = settings.source
    if isinstance(src, PemSourceSettings):
        return PemFileSource(
            src.cert_chain,
            src.key,
            src.bundle,
            trust_domain=src.trust_domain,
            federated=dict(src.federated),
            poll_interval=src.poll_interval,
            jwt_bundles=dict(src.jwt_bundles),
            on_event=on_event,
        )
    return WorkloadApiSource(src.endpoint, on_event=on_event)


_EVENT_LEVELS = {
    "update": logging.DEBUG,  # the subscriber logs applied contexts
    "connected": logging.INFO,
    "backoff": logging.DEBUG,  # the stream_error before it is the news
    "rejected": logging.WARNING,
    "stream_error": logging.WARNING,
    "duplicate_hint": logging.WARNING,
    "expired": logging.WARNING,
    "subscriber_error": logging.ERROR,
    "fatal": logging.ERROR,
    # JWT bundles (their own stream or files) and the app's JWT-SVIDs (sidecar.jwtsource)
    "jwt_update": logging.INFO,  # trust domains and key counts, never key material
    "jwt_connected": logging.DEBUG,
    "jwt_backoff": logging.DEBUG,
    "jwt_rejected": logging.WARNING,
    "jwt_stream_error": logging.WARNING,
    "jwt_stopped": logging.WARNING,
    "jwt_svid_error": logging.WARNING,
    "jwt_svid_idle": logging.DEBUG,
}
# Failures logged once a minute while they repeat, by group: both Workload API streams failing for one
# cause (an absent socket) are one group, so the cause is said once.
_REPEATING = {"stream_error": "stream", "jwt_stream_error": "stream", "jwt_svid_error": "jwt_svid"}
_RECOVERED = {"connected": "stream", "update": "stream", "jwt_connected": "stream", "jwt_update": "stream"}


@dataclass(slots=True)
class _Repeat:
    detail: str = ""
    count: int = 0
    logged: float = 0.0


def _source_metrics(metrics: Metrics) -> Callable[[SourceEvent], None]:
    """Log each source event and keep spiffe_sidecar_svid_source_up / _errors_total (the alerts read them).

    A stream error repeated on every reconnect (an absent agent socket) is logged at WARNING the first time
    and after that once a minute, with the number of attempts; the others go to DEBUG. The X.509 stream,
    the JWT bundle stream and JWT-SVID fetches are counted apart (one can fail while the others work).
    `jwt_svid_error` also counts in spiffe_sidecar_jwt_svid_fetch_errors_total."""
    repeats = {group: _Repeat() for group in set(_REPEATING.values())}

    def on_event(event: SourceEvent) -> None:
        group = _REPEATING.get(event.kind)
        last = None if group is None else repeats[group]
        detail = event.detail
        if event.kind == "jwt_stream_error":
            detail = detail.partition(": ")[2] or detail  # "FetchJWTBundles: <cause>": the cause alone
        if last is not None and detail == last.detail:
            last.count += 1
            now = time.monotonic()
            if now - last.logged < 60.0:
                log.debug("svid source %s: %s (again): %s", event.source, event.kind, event.detail)
            else:
                last.logged = now
                log.warning("svid source %s: still failing after %d attempts: %s", event.source, last.count,
                            event.detail)  # fmt: skip
        else:
            if last is not None:
                last.detail, last.count, last.logged = detail, 1, time.monotonic()
            elif event.kind in _RECOVERED:
                again = repeats[_RECOVERED[event.kind]]
                again.detail, again.count = "", 0
            _source_event(event)
        if event.kind == "jwt_svid_error":
            metrics.jwt_svid_fetch_errors.inc()
        if event.kind in ("connected", "update"):
            metrics.source_connected.set(1)
        elif event.kind in ("stream_error", "fatal", "expired"):
            metrics.source_connected.set(0)
        if event.kind in ("stream_error", "rejected", "fatal"):
            metrics.source_errors.labels(kind=event.kind).inc()

    return on_event


def _source_event(event: SourceEvent) -> None:
    # One line per source event (reconnects, rejected file sets, expiry); events never carry key material.
    level = _EVENT_LEVELS.get(event.kind, logging.INFO)
    delay = f" (retry in {event.delay:.1f}s)" if event.delay is not None else ""
    log.log(
        level, "svid source %s: %s%s%s", event.source, event.kind, f": {event.detail}" if event.detail else "", delay
    )


async def run(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    first_svid_timeout: float = FIRST_SVID_TIMEOUT,
    pod: PodRuntime | None = None,
    policy_poll_interval: float | None = None,
) -> int:
    """Run the sidecar until SIGTERM/SIGINT; return the process exit status (0 after a clean drain).

    Status 1 when the SVID source gives up or no SVID arrives within `first_svid_timeout`.
    `pod` (annotations mode): the policy file is a downward API annotations file, and the probe port and
    the bypass check run when configured.
    `policy_poll_interval`: seconds between checks of the policy file (default $SPIFFE_SIDECAR_POLICY_POLL_INTERVAL,
    else POLICY_POLL_INTERVAL); status 2 when the variable is not a number of seconds in [0.001, 3600].
    """
    poll = policy_poll_interval if policy_poll_interval is not None else _policy_poll_interval(environ)
    if poll is None:
        log.error("%s=%r: expected seconds between 0.001 and 3600", ENV_POLICY_POLL_INTERVAL,
                  environ.get(ENV_POLICY_POLL_INTERVAL))  # fmt: skip
        return 2
    reclaim = reclaimer(configure_allocator(environ))  # once per process, before any connection (sidecar.memory)
    del environ  # env overrides were applied by the config loader; kept in the signature for the CLI contract
    inbound_settings = settings.inbound
    if inbound_settings is not None and inbound_settings.policy is None:
        log.error("nothing to run: the inbound listener has no policy")
        return 2
    if inbound_settings is None and not settings.outbound and settings.outbound_proxy is None:
        log.error("nothing to run: the config has no inbound, outbound or outbound_proxy listener")
        return 2
    metrics = Metrics(max_callers=settings.metrics.max_callers)
    write, close_audit = open_writer(settings.audit.path)
    audit = AuditLog(settings.audit, write=write, clock=time.time, metrics=metrics, rng=random.random)
    policy_ref = None if inbound_settings is None or inbound_settings.policy is None else PolicyRef(
        inbound_settings.policy
    )
    tls = TlsContexts()
    state = _State()
    on_source_event = _source_metrics(metrics)
    source = _make_source(settings, on_source_event)
    stop = asyncio.Event()
    # JWT bundles (step-up rules validate against them) follow the source; JWT-SVIDs for outbound routes
    # with `jwt` come from FetchJWTSVID (the config refuses such routes with the PEM source).
    jwt_bundles = JwtBundleHolder()

    def on_jwt_bundles(snap: JwtBundles) -> None:
        jwt_bundles.set(snap)
        metrics.jwt_bundles_generation.set(jwt_bundles.current.generation)
        if jwt_bundles.updated_at is not None:
            metrics.jwt_bundles_updated.set(jwt_bundles.updated_at)

    jwt_svids = None
    if isinstance(settings.source, WorkloadApiSettings) and _wants_jwt_svids(settings):
        jwt_svids = JwtSvidFetcher(settings.source.endpoint, on_event=on_source_event)

    def on_context(ctx: X509Context) -> None:
        # Called on the loop for every new snapshot (SVID rotation or bundle change).
        if ctx is state.context:
            return
        tls.update(ctx)
        if state.context is not None:
            # New SVID or bundles: pooled outbound connections finish their current request and close;
            # new requests use new connections (new SVID presented, new bundles verified).
            for ob in outbound:
                ob.retire()
        state.context = ctx
        metrics.rotations.inc()
        metrics.svid_expiry.set(ctx.expires_at.timestamp())
        leaf = ctx.default_svid.leaf
        metrics.svid_lifetime.set((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds())
        log.info("X509 context applied: %s, SVID expires %s", ctx.default_svid.spiffe_id, ctx.expires_at.isoformat())

    def svid_expiry() -> datetime | None:
        # The last applied context, not source.current(): that turns None at expiry, and readiness should
        # then say "expired", not "no SVID yet".
        return None if state.context is None else state.context.expires_at

    inbound = None
    if inbound_settings is not None and policy_ref is not None:
        inbound = InboundServer(
            inbound_settings,
            timeouts=settings.timeouts,
            limits=settings.limits,
            tls=tls,
            policy=policy_ref,
            audit=audit,
            metrics=metrics,
            jwt_bundles=jwt_bundles,
        )
    outbound = _make_outbound(settings, tls, audit, metrics, jwt_svids)
    listeners: list[InboundServer | OutboundServer] = [*outbound] if inbound is None else [inbound, *outbound]
    bypass = None
    if pod is not None and pod.pod_ip is not None:
        check = BypassCheck(pod.pod_ip, pod.app_port, strict=pod.strict_bypass_check)
        bypass = BypassMonitor(check, metrics.app_port_exposed)
    admin = AdminServer(
        settings.admin.listen,
        metrics=metrics,
        svid_expiry=svid_expiry,
        listeners_bound=lambda: state.listeners_bound,
        config_view=lambda: config_view(settings, None if policy_ref is None else policy_ref.policy, source.current()),
        hold=(lambda: None) if bypass is None else bypass.hold_reason,
    )
    scrape = None
    if settings.metrics.listen is not None:
        scrape = MetricsServer(
            settings.metrics.listen,
            metrics=metrics,
            svid_expiry=svid_expiry,
            ready=lambda: admin.ready_reason() is None,
        )
    probe = None
    if pod is not None and pod.probe_listen is not None:
        probe = ProbeServer(pod.probe_listen, pod.probe_routes, ready_reason=admin.ready_reason, metrics=metrics)

    async def guard_source() -> None:
        # A source that gives up (e.g. InvalidArgument from the Workload API) ends the process.
        try:
            await source.run()
        except SourceError as exc:
            state.fail(1, f"SVID source failed: {exc}", stop)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    unsubscribe = source.subscribe(on_context)
    on_jwt_bundles(source.jwt_bundles())
    unsubscribe_jwt = source.subscribe_jwt(on_jwt_bundles)
    try:
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(guard_source(), name="svid-source")]
            if jwt_svids is not None:
                background.append(tg.create_task(jwt_svids.run(), name="jwt-svids"))
            background.append(tg.create_task(reclaim.run(lambda: sum(s.open_connections for s in listeners))))
            try:
                await admin.start()
            except OSError as exc:
                state.fail(1, f"admin listener {settings.admin.listen}: {exc.strerror or exc}", stop)
            if scrape is not None and not stop.is_set():
                try:
                    await scrape.start()
                except OSError as exc:
                    state.fail(1, f"metrics listener {settings.metrics.listen}: {exc.strerror or exc}", stop)
            if probe is not None and not stop.is_set():
                try:  # up before the SVID: the kubelet's startupProbe reads readyz (503 until ready) here
                    await probe.start()
                except OSError as exc:
                    state.fail(1, f"probe listener {pod and pod.probe_listen}: {exc.strerror or exc}", stop)
            if bypass is not None:
                background.append(tg.create_task(bypass.run(), name="bypass-check"))
            ctx = None if stop.is_set() else await _wait_first_svid(source, first_svid_timeout, stop)
            if ctx is None:
                if not stop.is_set():
                    state.fail(
                        1,
                        f"no X.509-SVID after {first_svid_timeout:.0f}s; check the Workload API socket and that "
                        "a registration entry matches this workload",
                        stop,
                    )
            else:
                on_context(ctx)
                bound: list[str] = []  # for the ready line
                if inbound is not None:
                    try:
                        port = await inbound.start()
                    except OSError as exc:
                        state.fail(1, f"inbound listener {inbound.settings.listen}: {exc.strerror or exc}", stop)
                    else:
                        ib = inbound.settings
                        bound.append(f"inbound {ib.listen.host}:{port} -> app {ib.app} ({ib.mode.value})")
                if not stop.is_set():
                    for ob in outbound:
                        try:
                            ob_port = await ob.start()
                        except OSError as exc:
                            state.fail(1, f"outbound listener {ob.settings.listen}: {exc.strerror or exc}", stop)
                            break
                        log.info("outbound %s: 127.0.0.1 port %d -> %s", ob.name, ob_port,
                                 ", ".join(f"{k or r.name}={r.target} (expect {r.expect.text})"
                                           for k, r in ob.routes.items()))  # fmt: skip
                        bound.append(f"outbound {ob.name} {ob.settings.listen.host}:{ob_port}")
                if not stop.is_set():
                    # Ready = an SVID is held and every configured listener is bound.
                    state.listeners_bound = True
                    policy_text = "none" if policy_ref is None else _rule_summary(policy_ref.policy)
                    for warning in [] if policy_ref is None else policy_warnings(policy_ref.policy):
                        log.warning("%s", warning)
                    log.info(
                        "ready: %s, identity %s, policy %s, admin %s",
                        ", ".join(bound),
                        ctx.default_svid.spiffe_id,
                        policy_text,
                        HostPort(settings.admin.listen.host, admin.port or settings.admin.listen.port),
                    )
                    if inbound_settings is not None and policy_ref is not None and inbound_settings.policy_file:
                        watcher = PolicyWatcher(
                            inbound_settings.policy_file,
                            policy_ref,
                            metrics,
                            # pod: the text that was compiled, so an edit made while we waited for the SVID
                            # is not mistaken for the running policy.
                            initial_text=_read_text(inbound_settings.policy_file) if pod is None else pod.initial_text,
                            load=load_policy if pod is None else load_annotations_policy,
                        )
                        background.append(tg.create_task(watcher.run(poll), name="policy-watcher"))
                    background.append(tg.create_task(_flush_audit(audit), name="audit-flush"))

            await stop.wait()
            if state.listeners_bound:
                log.info("stopping: draining in-flight requests (up to %.1fs)", settings.timeouts.drain)
                state.listeners_bound = False  # readyz -> 503 so endpoints stop routing here
                try:
                    async with asyncio.timeout(settings.timeouts.drain + _STOP_GRACE):
                        await asyncio.gather(*(s.drain(settings.timeouts.drain) for s in listeners))
                except TimeoutError:
                    log.warning("drain did not finish within %.1fs; closed the rest", settings.timeouts.drain)
            for task in background:
                task.cancel()
    finally:
        unsubscribe()
        unsubscribe_jwt()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_STOP_GRACE):
                await admin.stop()
        for server in (probe, scrape):
            if server is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_STOP_GRACE):
                        await server.stop()
        audit.flush_dropped()
        close_audit()
    if state.exit_code:
        log.error("%s", state.exit_reason)
        return state.exit_code
    log.info("stopped")
    return 0


def _wants_jwt_svids(settings: Settings) -> bool:
    targets = [r.to for r in settings.outbound]
    if settings.outbound_proxy is not None:
        targets += [to for _, to in settings.outbound_proxy.routes]
    return any(to.jwt for to in targets)


def _make_outbound(
    settings: Settings, tls: TlsContexts, audit: AuditLog, metrics: Metrics, jwt_svids: JwtSvidFetcher | None
) -> list[OutboundServer]:
    """One listener per fixed outbound route, plus the HTTP proxy port when configured."""
    common = {"timeouts": settings.timeouts, "limits": settings.limits, "tls": tls, "audit": audit, "metrics": metrics}
    servers: list[OutboundServer] = []
    for r in settings.outbound:
        size = settings.limits.max_connections if r.mode is ListenerMode.TCP else settings.limits.upstream_pool_size
        routes = build_routes([(r.name, r.to)], tls=tls, metrics=metrics, timeouts=settings.timeouts, pool_size=size,
                              jwt_svids=jwt_svids)  # fmt: skip
        servers.append(OutboundServer(r.name, r.listen, routes, by_host=False, mode=r.mode, **common))  # type: ignore[arg-type]
    proxy = settings.outbound_proxy
    if proxy is not None:
        routes = build_routes(
            proxy.routes, tls=tls, metrics=metrics, timeouts=settings.timeouts,
            pool_size=settings.limits.upstream_pool_size, jwt_svids=jwt_svids,
        )  # fmt: skip
        servers.append(OutboundServer("proxy", proxy.listen, routes, by_host=True, **common))  # type: ignore[arg-type]
    return servers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


async def _wait_first_svid(
    source: WorkloadApiSource | PemFileSource, deadline: float, stop: asyncio.Event
) -> X509Context | None:
    """The first X509Context, logging progress every few seconds; None when stopped or after `deadline`."""
    started = time.monotonic()
    while not stop.is_set():
        left = deadline - (time.monotonic() - started)
        if left <= 0:
            return None
        waiter = asyncio.ensure_future(source.wait_ready(min(_PROGRESS_EVERY, left)))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()
        if waiter.done() and not waiter.cancelled():
            exc = waiter.exception()
            if exc is None:
                ctx: X509Context = waiter.result()
                return ctx
            if not isinstance(exc, SourceError):
                raise exc
            log.info("waiting for the first X.509-SVID (%.0fs so far)", time.monotonic() - started)
    return None


async def _flush_audit(audit: AuditLog) -> None:
    while True:
        await asyncio.sleep(_AUDIT_FLUSH_EVERY)
        audit.flush_dropped()

"""The embedded SPIRE at runtime: CAs, SVID rotation and the SPIFFE Workload API over gRPC on unix sockets.

grpclib (asyncio) serves the API because it exposes the accepted transport: the caller's uid/gid come from
SO_PEERCRED on that socket (SPIFFE Workload Endpoint §5: identify the caller out of band, never from what it
says). Every stream message carries the full state (Workload API §4.3) and the first one is sent at once.
All state lives on one event loop; `SpireThread` runs it on its own thread for blocking callers.

Like SPIRE's agent, every socket also serves grpc.health.v1 and server reflection (Workload Endpoint §7:
SHOULD), without the security header. grpclib's generated modules for those register the same protobuf
symbols as grpcio-health-checking's and grpcio-reflection's: one process cannot import both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography import x509
from google.protobuf.descriptor_pool import DescriptorPool  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server, Stream

from sidecar import jwtsvid as jwt_core
from sidecar._proto import workload_pb2 as pb
from sidecar._proto.workload_grpc import SpiffeWorkloadAPIBase
from sidecar.errors import ConfigError, IdentityError, JwtSvidError, Problem
from sidecar.identity import SpiffeId, TrustDomain

from .ca import AuthorityManager, IssuedX509Svid, JwtAuthority
from .entries import RegistrationEntry, SpireConfig
from .jwtsvid import JwtKeyManager, jwks_json

log = logging.getLogger("spire")

HEADER_KEY: Final = "workload.spiffe.io"
HEADER_VALUE: Final = "true"
SEND_TIMEOUT: Final = 10.0  # a client that does not read its stream for this long is dropped
RECHECK_INTERVAL: Final = 300.0  # upper bound on a stream's wait for a change (bounded await)
STOP_TIMEOUT: Final = 5.0
SHARED_SOCKET_MODE: Final = 0o666  # anyone may ask; attestation decides (like SPIRE's public socket)
STATIC_SOCKET_MODE: Final = 0o600  # static mode: access to the socket file is the identity

_T = TypeVar("_T")
Clock = Callable[[], dt.datetime]
# ValidateJWTSVID always returns these, whatever the token's trust domain (SPIRE's isClaimAllowed).
SPIFFE_CLAIMS: Final = frozenset({"sub", "aud", "exp"})


def _reflection_pool() -> DescriptorPool:
    """What reflection describes: the Workload API (kept out of protobuf's default pool, see the Makefile's
    `proto` target), its struct.proto dependency, health and reflection itself."""
    pool = DescriptorPool()
    files = [*pb.DESCRIPTOR.dependencies, pb.DESCRIPTOR]  # google/protobuf/struct.proto first
    files += [m.DESCRIPTOR for m in (health_pb2, reflection_pb2, reflection_v1alpha_pb2)]
    for f in files:
        pool.AddSerializedFile(f.serialized_pb)
    return pool


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def peer_credentials(stream: Stream[Any, Any]) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, from the kernel (SO_PEERCRED)."""
    # grpclib's Peer keeps the transport privately; this is the documented way in to the raw socket.
    transport = getattr(stream.peer, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        raise GRPCError(Status.UNAVAILABLE, "cannot attest the caller: no peer credentials")
    fmt = "3i"
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, data)
    return int(pid), int(uid), int(gid)


def check_security_header(stream: Stream[Any, Any]) -> None:
    """SPIFFE Workload Endpoint §3/§6: exactly one `workload.spiffe.io` value, exactly `true`."""
    md = stream.metadata
    values = md.getall(HEADER_KEY, []) if md is not None else []
    if len(values) != 1 or values[0] != HEADER_VALUE:
        raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a stale socket from an earlier run; never remove anything else


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def write_svid_pem(svid: IssuedX509Svid, directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.crt` (chain, 0644) and `<name>.key` (PKCS#8, created 0600) for curl/openssl clients."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    crt.write_bytes(svid.chain_pem())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file already existed with a wider mode
        f.write(svid.key_pem())
    return crt, key


class EmbeddedSpire:
    """A development SPIRE: one CA (X.509 + JWT) per trust domain, SVIDs per entry, Workload API sockets.

    Build it, `await start()`, `await stop()` (or `async with`). Not thread-safe: call its methods on the
    loop that started it (use `SpireThread` from other threads). `now` is injectable; real rotation timers
    are asyncio timers computed from it, and `tick()` applies whatever is due (for fake clocks).
    """

    def __init__(self, config: SpireConfig, *, now: Clock = utc_now) -> None:
        self.config = config
        self._now = now
        t = now()
        self._cas: dict[TrustDomain, AuthorityManager] = {}
        self._jwt: dict[TrustDomain, JwtKeyManager] = {}
        for td in config.trust_domains:
            self._cas[td] = AuthorityManager(td, config.ca_ttl, t)
            self._jwt[td] = JwtKeyManager(td, config.jwt_key_ttl, t)
            log.info("trust_domain=%s created CA 1 and JWT key 1 kid=%s", td, self._jwt[td].active.kid)
        self._svids: list[IssuedX509Svid] = [self._issue(i, e, t) for i, e in enumerate(config.entries)]
        self._changed = asyncio.Event()
        self._version = 0
        self._listeners: list[Callable[[], None]] = []
        self._servers: list[tuple[Path, Server]] = []
        # Transports of accepted connections that made a call: grpclib's Server.close() cancels the
        # handlers but leaves their HTTP/2 connections open, so stop() closes these itself.
        self._transports: set[asyncio.Transport] = set()
        self._stopping = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = ServiceStatus()  # grpc.health.v1: SERVING once every socket is bound
        self._pool = _reflection_pool()

    # --- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every socket (shared + one per static socket) and start the rotation timer."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        try:
            for path, scope in self._socket_scopes():
                await self._serve(path, scope)
        except BaseException:
            await self.stop()
            raise
        self._serving.set(True)
        self._schedule()

    async def stop(self) -> None:
        """Close sockets and open streams; remove the socket files. Open streams end with UNAVAILABLE
        (sent as their trailers when the connection still takes writes), then every connection is closed,
        so clients see the stream end at once and reconnect (Workload API §4.3: clients retry)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._serving.set(False)  # health watchers hear NOT_SERVING before their connection closes
        self._stopping = True
        servers, self._servers = self._servers, []
        for _, server in servers:
            server.close()  # stops accepting; cancels handlers (each answers UNAVAILABLE, see _stream)
        for path, server in servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await server.wait_closed()
            _remove_socket(path)
        transports, self._transports = self._transports, set()
        for transport in transports:
            transport.abort()  # whatever is still buffered goes nowhere: the server is gone
        self._stopping = False

    async def _on_request(self, event: RecvRequest) -> None:
        # Every call on every service (Workload API, health, reflection) pins its connection for stop().
        self._track(getattr(event.peer, "_transport", None))  # see peer_credentials

    def _track(self, transport: asyncio.Transport | None) -> None:
        if transport is None:
            return
        if self._stopping or not self._servers:
            transport.abort()  # a call racing stop()
            return
        if len(self._transports) >= 64:  # prune closed ones; bounded by live connections
            self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)

    async def __aenter__(self) -> EmbeddedSpire:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _socket_scopes(self) -> Iterator[tuple[Path, tuple[int, ...] | None]]:
        """(socket path, entry indexes or None for the shared socket)."""
        static: dict[Path, list[int]] = {}
        has_shared = False
        for i, e in enumerate(self.config.entries):
            if e.socket is None:
                has_shared = True
            else:
                static.setdefault(self.config.socket_path_for(e), []).append(i)
        shared: Path | None = None
        if has_shared or self.config.socket is not None or self.config.socket_dir is not None:
            shared = self.config.shared_socket_path()
            yield shared, None
        for path, idx in static.items():
            if shared is not None and path.absolute() == shared.absolute():
                e = self.config.entries[idx[0]]
                raise ConfigError([Problem(f"{e.where}.socket", f"{path} is the shared socket; pick another name")])
            yield path, tuple(idx)

    async def _serve(self, path: Path, scope: tuple[int, ...] | None) -> None:
        _prepare_socket_path(path)
        api = _WorkloadApi(self, scope)
        health = Health({api: [self._serving]})  # "" (the whole server) and "SpiffeWorkloadAPI"
        server = Server(ServerReflection.extend([api, health], pool=self._pool))
        listen(server, RecvRequest, self._on_request)
        await server.start(path=str(path))
        self._servers.append((path, server))
        os.chmod(path, SHARED_SOCKET_MODE if scope is None else STATIC_SOCKET_MODE)
        what = "shared (unix selectors)" if scope is None else ", ".join(
            str(self.config.entries[i].spiffe_id) for i in scope
        )
        log.info("serving Workload API on unix://%s for %s", path, what)

    # --- public API ---------------------------------------------------------------------------------------

    @property
    def socket_paths(self) -> tuple[Path, ...]:
        return tuple(p for p, _ in self._servers)

    def entry(self, spiffe_id: str | SpiffeId) -> RegistrationEntry:
        """The first entry with this SPIFFE ID (KeyError if none)."""
        return self.config.entries[self._index_of_id(str(spiffe_id))]

    def socket_path_for(self, entry: RegistrationEntry | str | SpiffeId) -> Path:
        """Where the workload of `entry` (or of the first entry with that SPIFFE ID) must connect."""
        e = entry if isinstance(entry, RegistrationEntry) else self.entry(entry)
        return self.config.socket_path_for(e)

    def endpoint_for(self, entry: RegistrationEntry | str | SpiffeId) -> str:
        """`unix:///abs/path` for SPIFFE_ENDPOINT_SOCKET (SPIFFE Workload Endpoint §4)."""
        return "unix://" + str(self.socket_path_for(entry).absolute())

    def current_svid(self, entry: RegistrationEntry | str | SpiffeId) -> IssuedX509Svid:
        return self._svids[self._index(entry)]

    def x509_authorities(self, trust_domain: TrustDomain | str | None = None) -> tuple[x509.Certificate, ...]:
        """The CA certificates currently in the X.509 bundle of a trust domain (own by default)."""
        return tuple(a.certificate for a in self._ca(trust_domain).bundle())

    def bundle_pem(self, trust_domain: TrustDomain | str | None = None) -> bytes:
        """PEM of `x509_authorities` (e.g. for `curl --cacert`, `openssl s_client -CAfile`)."""
        return self._ca(trust_domain).bundle_pem()

    def jwt_bundle_json(self, trust_domain: TrustDomain | str | None = None) -> bytes:
        """The trust domain's JWT keys as a SPIFFE bundle (`use: jwt-svid`), e.g. for a JWKS file."""
        return jwks_json(self.jwt_authorities(trust_domain), spiffe_bundle=True)

    def jwt_authorities(self, trust_domain: TrustDomain | str | None = None) -> tuple[JwtAuthority, ...]:
        """The JWT signing keys in a trust domain's JWT bundle, the signing one first (tests forge with it)."""
        return self._jwt_keys(trust_domain).bundle()

    def rotate_jwt_key(self, trust_domain: TrustDomain | str | None = None) -> JwtAuthority:
        """Sign JWT-SVIDs with a new key (new kid) from now on. The old key stays in the JWT bundle until every
        token it signed has expired; the bundle streams get both keys at once."""
        mgr = self._jwt_keys(trust_domain)
        old = mgr.active
        mgr.activate(self._now())
        log.info("trust_domain=%s activated JWT key %d kid=%s; JWT key %d kid=%s retires once its tokens expire",
                 mgr.trust_domain, mgr.active.generation, mgr.active.kid, old.generation, old.kid)
        self._notify()
        self._schedule()
        return mgr.active

    def rotate_ca(self, trust_domain: TrustDomain | str | None = None, *, reissue: bool = False) -> None:
        """Rotate a trust domain's CA now. The new CA is pushed in the bundle before it signs anything; the
        old one stays in the bundle until every SVID it signed has expired. With `reissue`, every SVID of the
        trust domain is re-signed by the new CA at once (else they move over at their half-life)."""
        mgr = self._ca(trust_domain)
        now = self._now()
        if mgr.prepare(now):
            assert mgr.prepared is not None
            log.info("trust_domain=%s prepared CA %d", mgr.trust_domain, mgr.prepared.generation)
            self._notify()  # bundle first: relying parties learn the new CA before any SVID uses it
        old = mgr.active.generation
        mgr.activate(now)
        log.info(
            "trust_domain=%s activated CA %d; CA %d retires once its SVIDs expire",
            mgr.trust_domain,
            mgr.active.generation,
            old,
        )
        if reissue:
            for i, e in enumerate(self.config.entries):
                if e.spiffe_id.trust_domain == mgr.trust_domain:
                    self._svids[i] = self._issue(i, e, now)
        self._notify()
        self._schedule()

    def force_rotate(self, entry: RegistrationEntry | str | SpiffeId) -> IssuedX509Svid:
        """Issue a new X509-SVID for `entry` now and push it on every open stream."""
        i = self._index(entry)
        svid = self._issue(i, self.config.entries[i], self._now())
        self._svids[i] = svid
        self._notify()
        self._schedule()
        return svid

    def mint_x509_svid(
        self,
        spiffe_id: str | SpiffeId,
        ttl: float | None = None,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> IssuedX509Svid:
        """Sign an SVID outside any entry (tests/demo: e.g. a curl client identity). Not rotated."""
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        svid = self._ca(sid.trust_domain).issue(
            sid, ttl or self.config.svid_ttl, self._now(), dns_names, ip_addresses
        )
        log.info("minted X509-SVID spiffe_id=%s serial=%x not_after=%s", sid, svid.serial_number,
                 svid.not_after.isoformat())
        return svid

    def mint_jwt_svid(self, spiffe_id: str | SpiffeId, audience: Iterable[str], ttl: float | None = None) -> str:
        """Sign a JWT-SVID outside any entry (tests/demo), with the trust domain's active key."""
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        mgr = self._jwt_keys(sid.trust_domain)
        aud = list(audience)
        token = mgr.mint(sid, aud, ttl or self.config.jwt_ttl, self._now())
        log.info("issued JWT-SVID spiffe_id=%s aud=%s kid=%s", sid, ",".join(aud), mgr.active.kid)
        return token

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (on the loop) after every SVID or bundle change."""
        self._listeners.append(callback)

    @property
    def version(self) -> int:
        """Increases on every change pushed to streams."""
        return self._version

    async def wait_change(self, after: int, within: float) -> int:
        """Wait until `version` > `after`; TimeoutError after `within` seconds. Returns the version."""
        async with asyncio.timeout(within):
            while self._version <= after:
                await self._changed.wait()
        return self._version

    def tick(self) -> None:
        """Apply every rotation due at `now()`: CA prepare/activate/retire, SVIDs at half-life."""
        now = self._now()
        changed = False
        for td, mgr in self._cas.items():
            for event in mgr.tick(now):
                log.info("trust_domain=%s %s", td, event)
                changed = True
        for td, keys in self._jwt.items():
            for event in keys.tick(now):
                log.info("trust_domain=%s %s", td, event)
                changed = True
        for i, svid in enumerate(self._svids):
            if svid.rotate_at <= now:
                self._svids[i] = self._issue(i, self.config.entries[i], now)
                changed = True
        if changed:
            self._notify()
        self._schedule()

    # --- internals ----------------------------------------------------------------------------------------

    def _ca(self, trust_domain: TrustDomain | str | None) -> AuthorityManager:
        if trust_domain is None:
            return self._cas[self.config.trust_domain]
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        try:
            return self._cas[td]
        except KeyError:
            raise KeyError(f"this SPIRE has no CA for trust domain {td}") from None

    def _jwt_keys(self, trust_domain: TrustDomain | str | None) -> JwtKeyManager:
        return self._jwt[self._ca(trust_domain).trust_domain]

    def _index_of_id(self, spiffe_id: str) -> int:
        for i, e in enumerate(self.config.entries):
            if str(e.spiffe_id) == spiffe_id:
                return i
        raise KeyError(f"no registration entry for {spiffe_id}")

    def _index(self, entry: RegistrationEntry | str | SpiffeId) -> int:
        if not isinstance(entry, RegistrationEntry):
            return self._index_of_id(str(entry))
        for i, e in enumerate(self.config.entries):
            if e is entry:
                return i
        for i, e in enumerate(self.config.entries):
            if e == entry:
                return i
        raise KeyError(f"not an entry of this SPIRE: {entry.spiffe_id}")

    def _issue(self, index: int, entry: RegistrationEntry, now: dt.datetime) -> IssuedX509Svid:
        mgr = self._cas[entry.spiffe_id.trust_domain]
        svid = mgr.issue(entry.spiffe_id, self.config.svid_ttl_for(entry), now, entry.dns_names)
        log.info(
            "issued X509-SVID spiffe_id=%s entry=%d serial=%x not_after=%s ca=%d",
            entry.spiffe_id,
            index,
            svid.serial_number,
            svid.not_after.isoformat(),
            svid.authority_generation,
        )
        return svid

    def _notify(self) -> None:
        self._version += 1
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:
                log.exception("change listener failed")

    def _schedule(self) -> None:
        if self._loop is None or not self._servers:
            return
        if self._timer is not None:
            self._timer.cancel()
        due = min(
            [s.rotate_at for s in self._svids]
            + [m.next_event() for m in self._cas.values()]
            + [k.next_event() for k in self._jwt.values()]
        )
        delay = max(0.001, (due - self._now()).total_seconds())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        try:
            self.tick()
        except Exception:
            # Keep rotating: a failed step is logged and retried, never silently ends the timer.
            log.exception("rotation step failed; retrying in 1s")
            if self._loop is not None and self._servers:
                self._timer = self._loop.call_later(1.0, self._on_timer)

    # Response builders (full state every time, Workload API §4.3).

    def _entitled(self, scope: tuple[int, ...] | None, uid: int, gid: int) -> tuple[int, ...]:
        cands = scope if scope is not None else tuple(
            i for i, e in enumerate(self.config.entries) if e.socket is None
        )
        return tuple(i for i in cands if self.config.entries[i].matches(uid, gid))

    def _trust_domains_for(self, idx: tuple[int, ...]) -> list[TrustDomain]:
        """Own trust domain first (Workload API §5.2.2 MUST), then the entries' and their federations."""
        tds = [self.config.trust_domain]
        for i in idx:
            e = self.config.entries[i]
            for td in (e.spiffe_id.trust_domain, *e.federates_with):
                if td not in tds:
                    tds.append(td)
        return tds

    def x509_svid_response(self, idx: tuple[int, ...]) -> pb.X509SVIDResponse:
        resp = pb.X509SVIDResponse()
        own: set[TrustDomain] = set()
        for i in idx:
            e = self.config.entries[i]
            s = self._svids[i]
            own.add(e.spiffe_id.trust_domain)
            resp.svids.append(
                pb.X509SVID(
                    spiffe_id=str(e.spiffe_id),
                    x509_svid=s.chain_der(),
                    x509_svid_key=s.key_pkcs8_der(),
                    bundle=self._cas[e.spiffe_id.trust_domain].bundle_der(),
                    hint=e.hint,
                )
            )
        for i in idx:
            for td in self.config.entries[i].federates_with:
                if td not in own:
                    resp.federated_bundles[td.id_string()] = self._cas[td].bundle_der()
        return resp

    def x509_bundles_response(self, idx: tuple[int, ...]) -> pb.X509BundlesResponse:
        resp = pb.X509BundlesResponse()
        for td in self._trust_domains_for(idx):
            resp.bundles[td.id_string()] = self._cas[td].bundle_der()
        return resp

    def jwt_bundles_response(self, idx: tuple[int, ...]) -> pb.JWTBundlesResponse:
        resp = pb.JWTBundlesResponse()
        for td in self._trust_domains_for(idx):
            # Standard JWKS without `use`, as SPIRE sends them (bundleutil.StandardJWKS).
            resp.bundles[td.id_string()] = jwks_json(self._jwt[td].bundle())
        return resp

    def jwt_svid_response(self, idx: tuple[int, ...], audience: list[str], spiffe_id: str) -> pb.JWTSVIDResponse:
        now = self._now()
        resp = pb.JWTSVIDResponse()
        for i in idx:
            e = self.config.entries[i]
            if spiffe_id and str(e.spiffe_id) != spiffe_id:
                continue
            keys = self._jwt[e.spiffe_id.trust_domain]
            token = keys.mint(e.spiffe_id, audience, self.config.jwt_ttl_for(e), now)
            log.info("issued JWT-SVID spiffe_id=%s aud=%s kid=%s", e.spiffe_id, ",".join(audience), keys.active.kid)
            resp.svids.append(pb.JWTSVID(spiffe_id=str(e.spiffe_id), svid=token, hint=e.hint))
        return resp

    def validate(self, idx: tuple[int, ...], token: str, audience: str) -> pb.ValidateJWTSVIDResponse:
        """ValidateJWTSVID as SPIRE's agent answers it: against the own trust domain's JWT bundle plus those
        the caller's entries bring (none for a caller without entries), with go-jose's 60 s leeway; claims of
        another trust domain's token cut down to sub/aud/exp and `allowed_foreign_jwt_claims`."""
        bundles = {
            td: jwt_core.JwtBundle.from_keys(td, self._jwt[td].public_keys()) for td in self._trust_domains_for(idx)
        }
        v = jwt_core.validate(token, audience=audience, bundles=bundles, now=self._now().timestamp())
        claims = dict(v.claims)
        if v.subject.trust_domain != self.config.trust_domain:
            keep = SPIFFE_CLAIMS | self.config.allowed_foreign_jwt_claims
            claims = {k: c for k, c in claims.items() if k in keep}
        if isinstance(claims.get("aud"), str):
            claims["aud"] = [claims["aud"]]  # SPIRE always answers a list (RFC 7519 allows a lone string)
        resp = pb.ValidateJWTSVIDResponse(spiffe_id=str(v.subject))
        resp.claims.update(claims)
        return resp


class _WorkloadApi(SpiffeWorkloadAPIBase):
    """The SpiffeWorkloadAPI service for one socket; `scope` = its static entries, None = shared socket."""

    def __init__(self, spire: EmbeddedSpire, scope: tuple[int, ...] | None) -> None:
        self._spire = spire
        self._scope = scope

    def _attest(self, stream: Stream[Any, Any], *, need_identity: bool = True) -> tuple[int, ...]:
        check_security_header(stream)  # before anything else: the request is refused as a whole
        _pid, uid, gid = peer_credentials(stream)
        idx = self._spire._entitled(self._scope, uid, gid)
        if not idx and need_identity:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        return idx

    async def _stream(self, stream: Stream[Any, Any], build: Callable[[tuple[int, ...]], Any]) -> None:
        try:
            await self._stream_updates(stream, build)
        except asyncio.CancelledError:
            if not self._spire._stopping:
                raise
            # stop() cancelled us: end the stream with a status instead of leaving it open (grpclib
            # sends it as the trailers); stop() closes the connection right after.
            raise GRPCError(Status.UNAVAILABLE, "the Workload API server is stopping") from None

    async def _stream_updates(self, stream: Stream[Any, Any], build: Callable[[tuple[int, ...]], Any]) -> None:
        idx = self._attest(stream)
        async with asyncio.timeout(SEND_TIMEOUT):
            await stream.recv_message()
        last: bytes | None = None
        while True:
            changed = self._spire._changed  # taken before building: no change can slip in between
            msg = build(idx)
            data = msg.SerializeToString(deterministic=True)
            if data != last:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await stream.send_message(msg)
                last = data
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_INTERVAL):
                    await changed.wait()

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]) -> None:
        await self._stream(stream, self._spire.x509_svid_response)

    async def FetchX509Bundles(self, stream: Stream[pb.X509BundlesRequest, pb.X509BundlesResponse]) -> None:
        await self._stream(stream, self._spire.x509_bundles_response)

    async def FetchJWTBundles(self, stream: Stream[pb.JWTBundlesRequest, pb.JWTBundlesResponse]) -> None:
        await self._stream(stream, self._spire.jwt_bundles_response)

    async def FetchJWTSVID(self, stream: Stream[pb.JWTSVIDRequest, pb.JWTSVIDResponse]) -> None:
        idx = self._attest(stream)
        async with asyncio.timeout(SEND_TIMEOUT):
            req = await stream.recv_message()
        assert req is not None
        audience = [a for a in req.audience if a]  # SPIRE drops empty values and needs one left
        if not audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if req.spiffe_id:
            try:
                SpiffeId.parse(req.spiffe_id)
            except IdentityError as e:
                raise GRPCError(Status.INVALID_ARGUMENT, f"invalid requested SPIFFE ID: {e.reason}") from None
            if all(str(self._spire.config.entries[i].spiffe_id) != req.spiffe_id for i in idx):
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued for the requested SPIFFE ID")
        resp = self._spire.jwt_svid_response(idx, audience, req.spiffe_id)
        async with asyncio.timeout(SEND_TIMEOUT):
            await stream.send_message(resp)

    async def ValidateJWTSVID(
        self, stream: Stream[pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse]
    ) -> None:
        # SPIRE validates for anyone on the socket: attested, but no entry needed (its bundles only).
        idx = self._attest(stream, need_identity=False)
        async with asyncio.timeout(SEND_TIMEOUT):
            req = await stream.recv_message()
        assert req is not None
        if not req.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not req.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        try:
            resp = self._spire.validate(idx, req.svid, req.audience)
        except JwtSvidError as e:
            # The spec names no code for a token that fails validation; SPIRE answers InvalidArgument.
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid JWT-SVID: {e}") from None
        async with asyncio.timeout(SEND_TIMEOUT):
            await stream.send_message(resp)


class SpireThread:
    """Runs an `EmbeddedSpire` on its own event loop in a daemon thread, for blocking code (tests, demo).

    `with SpireThread(config) as t: t.spire.socket_path_for(...); t.call(lambda s: s.rotate_ca())`
    """

    def __init__(self, config: SpireConfig, *, now: Clock = utc_now, start_timeout: float = 10.0) -> None:
        self._config = config
        self._now = now
        self._start_timeout = start_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-spire", daemon=True)
        self._spire: EmbeddedSpire | None = None

    @property
    def spire(self) -> EmbeddedSpire:
        """The running SPIRE. Read-only use from other threads; mutate through `call`."""
        assert self._spire is not None, "SpireThread not started"
        return self._spire

    def start(self) -> SpireThread:
        self._thread.start()

        async def boot() -> EmbeddedSpire:
            s = EmbeddedSpire(self._config, now=self._now)
            await s.start()
            return s

        self._spire = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(self._start_timeout)
        return self

    def call(self, fn: Callable[[EmbeddedSpire], _T], timeout: float = 10.0) -> _T:
        """Run `fn(spire)` on the SPIRE's loop and return its result."""
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(self.spire))
            except BaseException as e:
                fut.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._spire is not None:
            asyncio.run_coroutine_threadsafe(self._spire.stop(), self._loop).result(timeout)
            self._spire = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> SpireThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

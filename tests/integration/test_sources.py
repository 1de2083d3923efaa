"""sidecar.sources against real sockets and real files.

The Workload API source talks to a tiny grpclib Workload API server defined here (serving certificates
from tests/pki.py) over a real unix socket / loopback TCP, and for JWT bundles to the embedded SPIRE (its
JWT key rotation) as well. PEM sources read real files rewritten the way cert-manager and spiffe-helper do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar._proto import workload_pb2
from sidecar._proto.workload_grpc import SpiffeWorkloadAPIBase
from sidecar.endpoint import TcpEndpoint, UnixEndpoint
from sidecar.errors import JwtSvidError, SourceError
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.jwtsource import JwtBundleHolder
from sidecar.jwtsvid import validate
from sidecar.sources import (
    NO_JWT_BUNDLES,
    JwtBundles,
    PemFileSource,
    SourceEvent,
    WorkloadApiSource,
    endpoint_from_env,
)
from sidecar.svid import X509Context
from spire.ca import JwtAuthority, new_jwt_authority
from spire.entries import parse_config
from spire.jwtsvid import jwks_json
from spire.server import EmbeddedSpire
from tests.pki import CA, Leaf, duplicate_extension, utcnow

pytestmark = pytest.mark.timeout(60)

A = TrustDomain.parse("a.test")
B = TrustDomain.parse("b.test")
WAIT = 15.0  # generous deadline for anything to happen on a shared machine


# ----------------------------------------------------------------------------------------------- helpers


class EventLog:
    """Collects SourceEvents and lets a test await one of a kind (no sleep polling)."""

    def __init__(self) -> None:
        self.events: list[SourceEvent] = []
        self._cond = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    def __call__(self, ev: SourceEvent) -> None:
        self.events.append(ev)
        self._loop.create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)

    async def wait(self, kind: str, count: int = 1, timeout: float = WAIT) -> SourceEvent:
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: self.count(kind) >= count)
        return [e for e in self.events if e.kind == kind][count - 1]

    async def wait_after(self, seen: int, kinds: tuple[str, ...], timeout: float = WAIT) -> SourceEvent:
        """The first event of one of `kinds` after the first `seen` events."""

        def found() -> SourceEvent | None:
            return next((e for e in self.events[seen:] if e.kind in kinds), None)

        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: found() is not None)
        ev = found()
        assert ev is not None
        return ev


def leaf_id(leaf: Leaf) -> str:
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def svid_msg(leaf: Leaf, ca: CA, hint: str = "", spiffe_id: str | None = None) -> workload_pb2.X509SVID:
    return workload_pb2.X509SVID(
        spiffe_id=spiffe_id if spiffe_id is not None else leaf_id(leaf),
        x509_svid=leaf.chain_der(),
        x509_svid_key=leaf.key_der(),
        bundle=ca.bundle_der(),
        hint=hint,
    )


def response(*svids: workload_pb2.X509SVID, federated: dict[str, bytes] | None = None
             ) -> workload_pb2.X509SVIDResponse:
    return workload_pb2.X509SVIDResponse(svids=list(svids), federated_bundles=federated or {})


class FakeWorkloadApi(SpiffeWorkloadAPIBase):
    """FetchX509SVID only: sends the current state first, then every pushed state (full state each time).

    `refuse` is a list of gRPC statuses to answer the next calls with, one per call, before serving.
    """

    def __init__(self, state: workload_pb2.X509SVIDResponse) -> None:
        self.state = state
        self.refuse: list[Status] = []
        self.calls = 0
        self.metadata: list[dict[str, Any]] = []
        self._streams: list[asyncio.Queue[workload_pb2.X509SVIDResponse]] = []
        self._transports: list[asyncio.Transport] = []

    def kill(self) -> None:
        """Drop every connection the way a dying agent process does (the kernel closes its sockets).

        grpclib's Server.close() only cancels handlers and leaves connections open, which no real agent
        restart does; test-only reach into grpclib for the transport.
        """
        for t in self._transports:
            t.abort()
        self._transports.clear()

    def push(self, state: workload_pb2.X509SVIDResponse) -> None:
        self.state = state
        for q in self._streams:
            q.put_nowait(state)

    async def FetchX509SVID(self, stream: Any) -> None:
        self.calls += 1
        self._transports.append(stream._stream._transport)
        self.metadata.append(dict(stream.metadata))
        await stream.recv_message()
        if stream.metadata.get("workload.spiffe.io") != "true":
            raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
        if self.refuse:
            status = self.refuse.pop(0)
            raise GRPCError(status, f"refused with {status.name}")
        q: asyncio.Queue[workload_pb2.X509SVIDResponse] = asyncio.Queue()
        self._streams.append(q)
        try:
            await stream.send_message(self.state)
            while True:
                await stream.send_message(await q.get())
        finally:
            self._streams.remove(q)

    async def FetchX509Bundles(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchJWTSVID(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchJWTBundles(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def ValidateJWTSVID(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)


@contextlib.asynccontextmanager
async def serving(api: FakeWorkloadApi, sock: Path) -> AsyncIterator[Server]:
    server = Server([api])
    await server.start(path=str(sock))
    try:
        yield server
    finally:
        api.kill()
        server.close()
        async with asyncio.timeout(WAIT):
            await server.wait_closed()


@contextlib.asynccontextmanager
async def running(source: WorkloadApiSource | PemFileSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SourceError):
            async with asyncio.timeout(WAIT):
                await task


@pytest.fixture(scope="module")
def root_a() -> CA:
    return CA.root("a.test")


@pytest.fixture(scope="module")
def root_b() -> CA:
    return CA.root("b.test")


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def new_source(sock: Path, log: EventLog, **kw: Any) -> WorkloadApiSource:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return WorkloadApiSource(UnixEndpoint(str(sock)), on_event=log, **kw)


# ----------------------------------------------------------------------------------------------- Workload API


async def test_initial_fetch(root_a: CA, root_b: CA, sock: Path) -> None:
    web = root_a.intermediate().leaf("spiffe://a.test/web")
    api = FakeWorkloadApi(response(svid_msg(web, root_a), federated={"spiffe://b.test": root_b.bundle_der()}))
    log = EventLog()
    src = new_source(sock, log)
    assert src.current() is None and not src.healthy()
    async with serving(api, sock), running(src):
        ctx = await src.wait_ready(WAIT)
    assert ctx.default_svid.spiffe_id == SpiffeId.parse("spiffe://a.test/web")
    assert len(ctx.default_svid.cert_chain) == 2
    assert set(ctx.bundles) == {A, B}
    assert ctx.bundle_for(A) is not None and ctx.bundle_for(A).authorities == (root_a.cert,)  # type: ignore[union-attr]
    assert api.metadata[0]["workload.spiffe.io"] == "true"
    assert "connected" in log.kinds() and "update" in log.kinds()


async def test_update_pushed_becomes_current_and_redacts(root_a: CA, root_b: CA, sock: Path) -> None:
    one = root_a.leaf("spiffe://a.test/one")
    api = FakeWorkloadApi(response(svid_msg(one, root_a), federated={"spiffe://b.test": root_b.bundle_der()}))
    log = EventLog()
    src = new_source(sock, log)
    seen: list[X509Context] = []
    got = asyncio.Event()

    def on_ctx(ctx: X509Context) -> None:
        seen.append(ctx)
        got.set()

    unsubscribe = src.subscribe(on_ctx)
    async with serving(api, sock), running(src):
        first = await src.wait_ready(WAIT)
        two = root_a.leaf("spiffe://a.test/two")
        got.clear()
        # Full state without federated_bundles: b.test must be unloaded (Workload API §4.4).
        api.push(response(svid_msg(two, root_a)))
        async with asyncio.timeout(WAIT):
            await got.wait()
        cur = src.current()
        assert cur is not None and cur is seen[-1]
        assert str(cur.default_svid.spiffe_id) == "spiffe://a.test/two"
        assert set(cur.bundles) == {A}
        assert cur.version > first.version
        unsubscribe()
        api.push(response(svid_msg(root_a.leaf("spiffe://a.test/three"), root_a)))
        await log.wait("update", 3)
        assert str(src.current().default_svid.spiffe_id) == "spiffe://a.test/three"  # type: ignore[union-attr]
    assert len(seen) == 2  # nothing after unsubscribe


async def test_bad_messages_are_discarded_last_good_kept(root_a: CA, sock: Path) -> None:
    good = root_a.leaf("spiffe://a.test/good")
    api = FakeWorkloadApi(response(svid_msg(good, root_a)))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        await src.wait_ready(WAIT)
        bad = svid_msg(root_a.leaf("spiffe://a.test/bad"), root_a)
        bad.bundle = b""  # mandatory field at default (§4.5)
        api.push(response(bad))
        ev = await log.wait("rejected", 1)
        assert "bundle" in ev.detail and "§4.5" in ev.detail
        api.push(response())  # no SVIDs at all
        await log.wait("rejected", 2)
        mismatch = svid_msg(root_a.leaf("spiffe://a.test/x"), root_a, spiffe_id="spiffe://a.test/y")
        api.push(response(mismatch))
        await log.wait("rejected", 3)
        wrong_key = svid_msg(root_a.leaf("spiffe://a.test/k"), root_a)
        wrong_key.x509_svid_key = root_a.leaf("spiffe://a.test/k").key_der()
        api.push(response(wrong_key))
        ev = await log.wait("rejected", 4)
        assert "key_mismatch" in ev.detail and "PRIVATE" not in ev.detail
        cur = src.current()
        assert cur is not None and str(cur.default_svid.spiffe_id) == "spiffe://a.test/good"
        assert log.count("update") == 1


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


async def test_malformed_certificates_are_rejected_not_stream_errors(root_a: CA, sock: Path) -> None:
    # Issue 10 item 9: a certificate that does not parse (here: a duplicated extension, validly signed) is
    # a bad message (rejected, last good kept, stream kept), not a broken stream to reconnect.
    good = root_a.leaf("spiffe://a.test/good")
    api = FakeWorkloadApi(response(svid_msg(good, root_a)))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src) as task:
        first = await src.wait_ready(WAIT)
        dup = root_a.leaf("spiffe://a.test/dup")
        bad_svid = svid_msg(dup, root_a)
        bad_svid.x509_svid = duplicate_extension(dup.cert, root_a, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        bad_bundle = svid_msg(root_a.leaf("spiffe://a.test/b"), root_a)
        bad_bundle.bundle = duplicate_extension(root_a.cert, root_a, ExtensionOID.BASIC_CONSTRAINTS)
        bad_federated = response(svid_msg(root_a.leaf("spiffe://a.test/f"), root_a),
                                 federated={"spiffe://b.test": duplicate_extension(root_a.cert, root_a,
                                                                                   ExtensionOID.KEY_USAGE)})
        for msg in (response(bad_svid), response(bad_bundle), bad_federated):
            seen = len(log.events)
            api.push(msg)
            ev = await log.wait_after(seen, ("rejected", "stream_error", "update"))
            assert ev.kind == "rejected", ev
            assert "malformed_certificate" in ev.detail and "uplicate" in ev.detail
            assert src.current() is first and not task.done()
    assert api.calls == 1 and log.count("stream_error") == 0


async def test_duplicate_hints_keep_first(root_a: CA, sock: Path) -> None:
    first = svid_msg(root_a.leaf("spiffe://a.test/first"), root_a, hint="internal")
    second = svid_msg(root_a.leaf("spiffe://a.test/second"), root_a, hint="internal")
    third = svid_msg(root_a.leaf("spiffe://a.test/third"), root_a, hint="external")
    api = FakeWorkloadApi(response(first, second, third))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        ctx = await src.wait_ready(WAIT)
    assert [str(s.spiffe_id) for s in ctx.svids] == ["spiffe://a.test/first", "spiffe://a.test/third"]
    assert [s.hint for s in ctx.svids] == ["internal", "external"]
    assert log.count("duplicate_hint") == 1


async def test_server_stopped_keeps_last_good_and_reconnects(root_a: CA, sock: Path) -> None:
    api = FakeWorkloadApi(response(svid_msg(root_a.leaf("spiffe://a.test/before"), root_a)))
    log = EventLog()
    src = new_source(sock, log)
    async with running(src):
        async with serving(api, sock):
            before = await src.wait_ready(WAIT)
        # Server gone: the stream fails, the source backs off and keeps serving the last good context.
        await log.wait("backoff", 2)
        assert src.current() is before and src.healthy()
        backoffs = [e for e in log.events if e.kind == "backoff"]
        assert all(e.delay is not None and 0 < e.delay <= 0.5 for e in backoffs)
        api.state = response(svid_msg(root_a.leaf("spiffe://a.test/after"), root_a))
        async with serving(api, sock):
            await log.wait("update", 2)
            cur = src.current()
            assert cur is not None and str(cur.default_svid.spiffe_id) == "spiffe://a.test/after"
    assert api.calls >= 2


async def test_invalid_argument_is_not_retried(root_a: CA, sock: Path) -> None:
    api = FakeWorkloadApi(response(svid_msg(root_a.leaf(), root_a)))
    api.refuse = [Status.INVALID_ARGUMENT] * 5
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock):
        task = asyncio.create_task(src.run())
        with pytest.raises(SourceError) as ei:
            async with asyncio.timeout(WAIT):
                await task
        msg = str(ei.value)
        assert "InvalidArgument" in msg and "not retrying" in msg and "\n" not in msg
        with pytest.raises(SourceError):
            await src.wait_ready(1.0)
    assert api.calls == 1
    assert log.count("fatal") == 1 and log.count("backoff") == 0


async def test_permission_denied_is_retried(root_a: CA, sock: Path) -> None:
    api = FakeWorkloadApi(response(svid_msg(root_a.leaf("spiffe://a.test/late"), root_a)))
    api.refuse = [Status.PERMISSION_DENIED, Status.PERMISSION_DENIED, Status.UNAVAILABLE]
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        ctx = await src.wait_ready(WAIT)
    assert str(ctx.default_svid.spiffe_id) == "spiffe://a.test/late"
    assert api.calls == 4
    assert log.count("backoff") == 3
    assert "PERMISSION_DENIED" in next(e for e in log.events if e.kind == "stream_error").detail


async def test_wait_ready_times_out_without_server(sock: Path) -> None:
    log = EventLog()
    src = new_source(sock, log)
    async with running(src):
        with pytest.raises(SourceError, match=r"no valid X\.509-SVID"):
            await src.wait_ready(0.5)
        await log.wait("backoff")


async def test_default_svid_expiry_drops_readiness(root_a: CA, sock: Path) -> None:
    now = utcnow()
    short = root_a.leaf("spiffe://a.test/short", not_before=now - dt.timedelta(minutes=1),
                        not_after=now + dt.timedelta(seconds=2))
    api = FakeWorkloadApi(response(svid_msg(short, root_a)))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        await src.wait_ready(WAIT)
        await log.wait("expired")
        assert src.current() is None and not src.healthy()


async def test_tcp_endpoint(root_a: CA) -> None:
    api = FakeWorkloadApi(response(svid_msg(root_a.leaf("spiffe://a.test/tcp"), root_a)))
    server = Server([api])
    await server.start("127.0.0.1", 0)
    try:
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        src = WorkloadApiSource(TcpEndpoint("127.0.0.1", port))
        async with running(src):
            ctx = await src.wait_ready(WAIT)
        assert str(ctx.default_svid.spiffe_id) == "spiffe://a.test/tcp"
    finally:
        server.close()
        await server.wait_closed()


def test_endpoint_from_env() -> None:
    assert endpoint_from_env({"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/api.sock"}) == UnixEndpoint(
        "/run/spire/api.sock"
    )


# ----------------------------------------------------------------------------------------------- PEM files


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_set(d: Path, leaf: Leaf, ca: CA, names: tuple[str, str, str] = ("tls.crt", "tls.key", "ca.crt")) -> None:
    write_atomic(d / names[0], leaf.chain_pem())
    write_atomic(d / names[1], leaf.key_pem())
    write_atomic(d / names[2], ca.bundle_pem())


def pem_source(d: Path, log: Callable[[SourceEvent], None], **kw: Any) -> PemFileSource:
    return PemFileSource(d / "tls.crt", d / "tls.key", d / "ca.crt", on_event=log, **kw)


async def test_pem_rotation(root_a: CA, tmp_path: Path) -> None:
    write_set(tmp_path, root_a.leaf("spiffe://a.test/v1"), root_a)
    log = EventLog()
    src = pem_source(tmp_path, log, poll_interval=0.05)
    got = asyncio.Event()
    src.subscribe(lambda ctx: got.set())
    async with running(src):
        first = await src.wait_ready(WAIT)
        assert str(first.default_svid.spiffe_id) == "spiffe://a.test/v1"
        assert set(first.bundles) == {A}
        got.clear()
        write_set(tmp_path, root_a.intermediate().leaf("spiffe://a.test/v2"), root_a)
        async with asyncio.timeout(WAIT):
            await got.wait()
        cur = src.current()
        assert cur is not None and str(cur.default_svid.spiffe_id) == "spiffe://a.test/v2"
        assert len(cur.default_svid.cert_chain) == 2
        assert log.count("rejected") == 0


async def test_pem_mismatched_key_rejected_last_good_kept(root_a: CA, tmp_path: Path) -> None:
    write_set(tmp_path, root_a.leaf("spiffe://a.test/good"), root_a)
    log = EventLog()
    src = pem_source(tmp_path, log)
    assert await src.poll_once()
    good = src.current()
    write_atomic(tmp_path / "tls.key", root_a.leaf().key_pem())
    assert not await src.poll_once()
    assert log.count("rejected") == 1
    assert "key_mismatch" in log.events[-1].detail and "PRIVATE" not in log.events[-1].detail
    assert src.current() is good
    assert not await src.poll_once()  # the same bad set is re-read but reported once
    assert log.count("rejected") == 1


async def test_pem_half_written_rejected_then_completed(root_a: CA, tmp_path: Path) -> None:
    write_set(tmp_path, root_a.leaf("spiffe://a.test/v1"), root_a)
    log = EventLog()
    src = pem_source(tmp_path, log)
    assert await src.poll_once()
    good = src.current()
    new = root_a.leaf("spiffe://a.test/v2")
    full = new.chain_pem()
    (tmp_path / "tls.crt").write_bytes(full[: len(full) // 2])  # writer still busy (non-atomic)
    assert not await src.poll_once()
    assert log.count("rejected") == 1 and "malformed_certificate" in log.events[-1].detail
    assert src.current() is good
    (tmp_path / "tls.crt").write_bytes(full)  # cert complete, key still the old one
    assert not await src.poll_once()
    assert "key_mismatch" in log.events[-1].detail
    (tmp_path / "tls.key").write_bytes(new.key_pem())
    assert await src.poll_once()
    assert str(src.current().default_svid.spiffe_id) == "spiffe://a.test/v2"  # type: ignore[union-attr]


async def test_pem_missing_file_and_wrong_trust_domain(root_a: CA, root_b: CA, tmp_path: Path) -> None:
    log = EventLog()
    src = PemFileSource(tmp_path / "svid.pem", tmp_path / "svid_key.pem", tmp_path / "svid_bundle.pem",
                        trust_domain=A, federated={B: tmp_path / "b.pem"}, on_event=log)
    assert not await src.poll_once()
    assert "missing file" in log.events[-1].detail
    (tmp_path / "b.pem").write_bytes(root_b.bundle_pem())
    write_set(tmp_path, root_b.leaf("spiffe://b.test/w"), root_b, ("svid.pem", "svid_key.pem", "svid_bundle.pem"))
    assert not await src.poll_once()
    assert "not in the configured trust domain" in log.events[-1].detail
    write_set(tmp_path, root_a.leaf("spiffe://a.test/w"), root_a, ("svid.pem", "svid_key.pem", "svid_bundle.pem"))
    assert await src.poll_once()
    ctx = src.current()
    assert ctx is not None and set(ctx.bundles) == {A, B}
    assert not await src.poll_once()  # unchanged


async def test_pem_kubelet_symlink_swap(root_a: CA, tmp_path: Path) -> None:
    # The kubelet's atomic writer: files are symlinks through `..data`, which is swapped in one rename.
    def publish(leaf: Leaf, gen: str) -> None:
        d = tmp_path / gen
        d.mkdir()
        write_set(d, leaf, root_a)
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(gen)
        os.replace(tmp_link, tmp_path / "..data")

    publish(root_a.leaf("spiffe://a.test/gen1"), "..gen1")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).symlink_to(Path("..data") / name)
    src = pem_source(tmp_path, EventLog())
    assert await src.poll_once()
    publish(root_a.leaf("spiffe://a.test/gen2"), "..gen2")
    assert await src.poll_once()
    assert str(src.current().default_svid.spiffe_id) == "spiffe://a.test/gen2"  # type: ignore[union-attr]


async def _first(task: asyncio.Task[None], waiting: Any) -> SourceEvent:
    """The awaited event, or the source task's own end (it must never end on a file's content)."""
    waiter = asyncio.ensure_future(waiting)
    await asyncio.wait({task, waiter}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        raise AssertionError(f"the PEM source stopped: {task.exception()!r}")
    if not waiter.done():  # asyncio.wait does not raise on its timeout: a source that went silent fails here
        waiter.cancel()
        raise AssertionError(f"no source event within {WAIT}s")
    return await waiter


async def test_pem_source_survives_any_file_content(root_a: CA, tmp_path: Path) -> None:
    # Issue 10 item 9: one bad file written into the SVID directory used to end the source's task (an
    # uncaught DuplicateExtension), and with it the sidecar. Every file content is now a rejected set.
    good = root_a.leaf("spiffe://a.test/good")
    write_set(tmp_path, good, root_a)
    log = EventLog()
    src = pem_source(tmp_path, log, poll_interval=0.02)
    dup_leaf = _pem(duplicate_extension(good.cert, root_a, ExtensionOID.SUBJECT_ALTERNATIVE_NAME))
    dup_root = _pem(duplicate_extension(root_a.cert, root_a, ExtensionOID.BASIC_CONSTRAINTS))
    bad_files = [
        ("tls.crt", dup_leaf, "malformed_certificate: DuplicateExtension"),
        ("ca.crt", dup_root, "ca.crt: malformed_certificate: DuplicateExtension"),
        ("tls.crt", b"\xff\xfe\x00 not a certificate \x80", "malformed_certificate"),
        ("tls.crt", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "malformed_certificate"),
        ("tls.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "malformed_key"),
        ("tls.key", os.urandom(200), "malformed_key"),
        ("ca.crt", b"", "ca.crt: malformed_certificate"),
        ("tls.crt", b"", "malformed_certificate"),
        ("tls.crt", dup_leaf, "malformed_certificate: DuplicateExtension"),  # the same bad file again
    ]
    async with running(src) as task:
        first = await src.wait_ready(WAIT)
        for name, data, why in bad_files:
            seen = len(log.events)
            write_atomic(tmp_path / name, data)
            ev = await _first(task, log.wait_after(seen, ("rejected", "update")))
            assert ev.kind == "rejected" and why in ev.detail, (name, ev)
            assert src.current() is first
            write_set(tmp_path, good, root_a)  # the good set again: same content, no new snapshot
        seen = len(log.events)
        write_set(tmp_path, root_a.leaf("spiffe://a.test/next"), root_a)
        ev = await _first(task, log.wait_after(seen, ("update",)))
        assert str(src.current().default_svid.spiffe_id) == "spiffe://a.test/next"  # type: ignore[union-attr]
    assert log.count("fatal") == 0


_FILE_ROOT = CA.root("a.test")
_FILE_LEAF = _FILE_ROOT.intermediate().leaf("spiffe://a.test/files")
_GOOD_FILES = (_FILE_LEAF.chain_pem(), _FILE_LEAF.key_pem(), _FILE_ROOT.bundle_pem())
_DUP_FILES = (
    _pem(duplicate_extension(_FILE_LEAF.cert, _FILE_ROOT, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)),
    _FILE_LEAF.key_pem(),
    _pem(duplicate_extension(_FILE_ROOT.cert, _FILE_ROOT, ExtensionOID.KEY_USAGE)),
)


def _mutated_pem(pem: bytes, mutations: list[tuple[int, int]]) -> bytes:
    """`pem`'s first block with bytes of its DER changed, re-wrapped: the parser sees mutated DER."""
    body = b"".join(pem.split(b"-----")[2].split())
    der = bytearray(base64.b64decode(body))
    for i, v in mutations:
        der[i % len(der)] = v
    label = pem.split(b"-----")[1]
    return b"-----" + label + b"-----\n" + base64.encodebytes(bytes(der)) + b"-----END" + label[5:] + b"-----\n"


_file_contents = st.one_of(
    st.binary(max_size=400),
    st.tuples(st.sampled_from(_GOOD_FILES + _DUP_FILES), st.lists(st.tuples(st.integers(0, 2000),
                                                                         st.integers(0, 255)), max_size=3)
              ).map(lambda t: _mutated_pem(*t)),
    st.sampled_from(_GOOD_FILES + _DUP_FILES),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(files={0: _DUP_FILES[0]})
@example(files={2: _DUP_FILES[2]})
@given(files=st.dictionaries(st.integers(0, 2), _file_contents, min_size=1))
def test_pem_files_of_any_bytes_never_stop_the_source(files: dict[int, bytes]) -> None:
    """Real files in a temp dir: after a good set, any bytes in any of the files give a new good set or a
    rejected one; the last good set stays served and `poll_once` never raises."""

    async def scenario(paths: tuple[Path, Path, Path]) -> None:
        for path, data in zip(paths, _GOOD_FILES, strict=True):
            write_atomic(path, data)
        events: list[SourceEvent] = []
        src = PemFileSource(*paths, on_event=events.append)
        assert await src.poll_once()
        good = src.current()
        for i, data in files.items():
            write_atomic(paths[i], data)
            os.utime(paths[i], ns=(1, 1))  # a stat change even within the clock's granularity
        published = await src.poll_once()
        assert src.current() is not None
        if not published and any(data != _GOOD_FILES[i] for i, data in files.items()):
            assert src.current() is good and events[-1].kind == "rejected"

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario((Path(d) / "tls.crt", Path(d) / "tls.key", Path(d) / "ca.crt")))


# ----------------------------------------------------------------------------------------------- JWT bundles
# The FetchJWTBundles stream beside the X.509 one, and JWKS files beside the PEM files: against the embedded
# SPIRE (its JWT key rotation) where it can serve the case, and the fake above where a fault must hit one
# stream only.

EX = TrustDomain.parse("example.org")
PARTNER = TrustDomain.parse("partner.org")
CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
INVENTORY = "spiffe://example.org/ns/shop/sa/inventory"
SPIRE_CONFIG = f"""
trust_domain: example.org
federation:
  - trust_domain: partner.org
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
    federates_with: [partner.org]
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="src-", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def kids(snap: JwtBundles, td: TrustDomain = EX) -> set[str]:
    return set(snap.bundles[td].keys)


def ok(token: str, snap: JwtBundles, audience: str = "inventory") -> str:
    now = dt.datetime.now(dt.UTC).timestamp()
    return str(validate(token, audience=audience, bundles=snap.bundles, now=now).subject)


def refused(token: str, snap: JwtBundles, now: float) -> str:
    with pytest.raises(JwtSvidError) as ei:
        validate(token, audience="inventory", bundles=snap.bundles, now=now)
    return ei.value.reason


async def test_jwt_bundles_arrive_and_rotate_live_beside_the_x509_stream(sock_dir: Path) -> None:
    t = [dt.datetime.now(dt.UTC)]
    spire = EmbeddedSpire(parse_config(SPIRE_CONFIG, socket_dir=str(sock_dir)), now=lambda: t[0])
    log = EventLog()
    src = new_source(spire.socket_path_for(INVENTORY), log)
    holder = JwtBundleHolder()
    holder.follow(src)
    assert holder.current == NO_JWT_BUNDLES
    async with spire, running(src):
        await src.wait_ready(WAIT)
        first = await holder.wait_for(1, WAIT)
        assert set(first.bundles) == {EX}  # inventory does not federate with partner.org
        assert kids(first) == {a.kid for a in spire.jwt_authorities()}
        old = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
        assert ok(old, first) == CHECKOUT
        assert refused(spire.mint_jwt_svid("spiffe://partner.org/pay", ["inventory"]), first,
                       t[0].timestamp()) == "untrusted_trust_domain"

        spire.rotate_jwt_key()  # new kid signs; the old key stays while its token lives
        second = await holder.wait_for(2, WAIT)
        assert len(kids(second)) == 2 and kids(first) < kids(second)
        new = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
        assert ok(old, second) == ok(new, second) == CHECKOUT

        old_exp = jwt.decode(old, options={"verify_signature": False})["exp"]
        t[0] = dt.datetime.fromtimestamp(old_exp, dt.UTC)
        spire.tick()  # the old key's last token has expired: it leaves the bundle (full state, §4.4)
        third = await holder.wait_for(3, WAIT)
        assert kids(third) == {jwt.get_unverified_header(new)["kid"]}
        assert refused(old, third, old_exp - 1) == "unknown_kid"  # within exp, but its key is gone
        assert src.jwt_bundles() is third and holder.current is third
        assert first.generation == 1 and second.generation == 2  # snapshots are never mutated
    assert log.count("jwt_update") == 3 and log.count("jwt_connected") == 1
    assert log.count("update") == 1  # JWT key changes never re-published the X.509 context
    assert log.count("jwt_stream_error") == 0 and log.count("stream_error") == 0


async def test_jwt_keys_rotate_on_their_own_with_a_short_key_ttl(sock_dir: Path) -> None:
    config = parse_config(SPIRE_CONFIG, socket_dir=str(sock_dir), jwt_key_ttl=2.0, jwt_ttl=1.0)
    log = EventLog()
    async with EmbeddedSpire(config) as spire:
        src = new_source(spire.socket_path_for(CHECKOUT), log)
        holder = JwtBundleHolder()
        holder.follow(src)
        async with running(src):
            first = await holder.wait_for(1, WAIT)
            assert set(first.bundles) == {EX, PARTNER}  # checkout federates with partner.org
            # prepare (a key joins), activate (the unused old key leaves): two generations per key lifetime
            later = await holder.wait_for(first.generation + 3, WAIT)
            assert kids(later).isdisjoint(kids(first))
            assert ok(spire.mint_jwt_svid(CHECKOUT, ["inventory"]), src.jwt_bundles()) == CHECKOUT
    assert log.count("jwt_stream_error") == 0 and log.count("update") == 1


async def test_jwt_bundles_follow_an_agent_restart(sock_dir: Path) -> None:
    spire = EmbeddedSpire(parse_config(SPIRE_CONFIG, socket_dir=str(sock_dir)))
    log = EventLog()
    src = new_source(spire.socket_path_for(INVENTORY), log)
    holder = JwtBundleHolder()
    holder.follow(src)
    async with running(src):
        async with spire:
            first = await holder.wait_for(1, WAIT)
            ctx = await src.wait_ready(WAIT)
        # Agent gone: both streams fail and back off; the last bundles and the SVID stay in use.
        await log.wait("jwt_backoff", 2)
        await log.wait("backoff", 2)
        assert holder.current.generation == 1 and src.current() is ctx
        async with spire:
            await log.wait("jwt_connected", 2)
            await log.wait("connected", 2)
            active = spire.rotate_jwt_key()  # the old key signed nothing: it leaves at once
            assert kids(await holder.wait_for(2, WAIT)) == {active.kid} != kids(first)
    assert all(e.delay is not None and e.delay <= 0.5 for e in log.events if e.kind == "jwt_backoff")
    assert "does not exist" in next(e for e in log.events if e.kind == "jwt_stream_error").detail


class JwtFakeApi(FakeWorkloadApi):
    """FakeWorkloadApi plus FetchJWTBundles: the current JWT state first, then each pushed one; `break_jwt`
    ends the open JWT streams with a status while the X.509 streams go on."""

    def __init__(self, state: workload_pb2.X509SVIDResponse, jwt_state: workload_pb2.JWTBundlesResponse) -> None:
        super().__init__(state)
        self.jwt_state = jwt_state
        self.jwt_calls = 0
        self._jwt_queues: list[asyncio.Queue[workload_pb2.JWTBundlesResponse | Status]] = []

    def push_jwt(self, item: workload_pb2.JWTBundlesResponse | Status) -> None:
        if isinstance(item, workload_pb2.JWTBundlesResponse):
            self.jwt_state = item
        for q in self._jwt_queues:
            q.put_nowait(item)

    async def FetchJWTBundles(self, stream: Any) -> None:
        self.jwt_calls += 1
        self._transports.append(stream._stream._transport)
        await stream.recv_message()
        q: asyncio.Queue[workload_pb2.JWTBundlesResponse | Status] = asyncio.Queue()
        self._jwt_queues.append(q)
        try:
            await stream.send_message(self.jwt_state)
            while True:
                item = await q.get()
                if isinstance(item, Status):
                    raise GRPCError(item, f"{item.name} on purpose")
                await stream.send_message(item)
        finally:
            self._jwt_queues.remove(q)


def jwt_response(*authorities: JwtAuthority, extra: dict[str, bytes] | None = None) -> workload_pb2.JWTBundlesResponse:
    bundles = {authorities[0].trust_domain.id_string(): jwks_json(authorities)} if authorities else {}
    return workload_pb2.JWTBundlesResponse(bundles={**bundles, **(extra or {})})


def jwt_key(td: TrustDomain = A) -> JwtAuthority:
    return new_jwt_authority(td, 3600, dt.datetime.now(dt.UTC))


async def test_a_broken_jwt_stream_reconnects_alone(root_a: CA, sock: Path) -> None:
    k1, k2 = jwt_key(), jwt_key()
    api = JwtFakeApi(response(svid_msg(root_a.leaf("spiffe://a.test/web"), root_a)), jwt_response(k1))
    log = EventLog()
    src = new_source(sock, log)
    holder = JwtBundleHolder()
    holder.follow(src)
    async with serving(api, sock), running(src):
        ctx = await src.wait_ready(WAIT)
        assert kids(await holder.wait_for(1, WAIT), A) == {k1.kid}
        api.push_jwt(Status.UNAVAILABLE)
        err = await log.wait("jwt_stream_error")
        assert err.detail == "FetchJWTBundles: UNAVAILABLE: UNAVAILABLE on purpose"
        await log.wait("jwt_connected", 2)
        # The same full state again after the reconnect: no new generation (nothing changed).
        api.push_jwt(jwt_response(k1, k2))
        assert kids(await holder.wait_for(2, WAIT), A) == {k1.kid, k2.kid}
        assert holder.current.generation == 2
        assert src.current() is ctx
    assert api.calls == 1 and api.jwt_calls == 2
    assert log.count("connected") == 1 and log.count("stream_error") == 0 and log.count("update") == 1


async def test_a_failing_x509_stream_leaves_the_jwt_stream_alone(root_a: CA, sock: Path) -> None:
    api = JwtFakeApi(response(svid_msg(root_a.leaf("spiffe://a.test/late"), root_a)), jwt_response(jwt_key()))
    api.refuse = [Status.PERMISSION_DENIED] * 3
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        await src.wait_ready(WAIT)
        assert src.jwt_bundles().generation == 1
    assert log.count("stream_error") == 3 and log.count("jwt_stream_error") == 0 and api.jwt_calls == 1


async def test_bad_jwt_messages_are_discarded_last_good_kept(root_a: CA, sock: Path) -> None:
    good = jwt_key()
    api = JwtFakeApi(response(svid_msg(root_a.leaf(), root_a)), jwt_response(good))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src):
        await src.wait_ready(WAIT)
        await log.wait("jwt_update")
        first = src.jwt_bundles()
        bad = [
            (jwt_response(), "no bundles"),  # §6.2.2: MUST include the own trust domain
            (jwt_response(extra={"spiffe://a.test": b"{not json"}), "not a JSON JWK Set"),
            (jwt_response(extra={"spiffe://a.test": b'{"keys": {}}'}), "MUST be an array"),
            (jwt_response(extra={"spiffe://a.test/path": jwks_json([good])}), "with a path"),
            (jwt_response(good, extra={"b.test": b'{"keys": 1}'}), "b.test"),  # one bad bundle: all refused
        ]
        for msg, why in bad:
            seen = len(log.events)
            api.push_jwt(msg)
            ev = await log.wait_after(seen, ("jwt_rejected", "jwt_update", "jwt_stream_error"))
            assert ev.kind == "jwt_rejected" and why in ev.detail, (why, ev)
            assert src.jwt_bundles() is first
        # A key the bundle cannot use is dropped with a reason; the rest of the bundle loads.
        weak = {"kty": "RSA", "kid": "weak", "n": "AQAB", "e": "AQAB"}
        added = jwt_key()
        keys = json.loads(jwks_json([good, added]))["keys"] + [weak]
        api.push_jwt(jwt_response(extra={"spiffe://a.test": json.dumps({"keys": keys}).encode()}))
        ev = await log.wait("jwt_update", 2)
        assert "a.test: 2 key(s), 1 ignored" in ev.detail and "'weak'" in ev.detail
        assert src.jwt_bundles().generation == 2 and kids(src.jwt_bundles(), A) == {good.kid, added.kid}
        # Keys reordered, the weak one gone: the same usable keys, so no new generation.
        api.push_jwt(jwt_response(added, good))
        api.push_jwt(jwt_response(extra={"spiffe://a.test": b"{"}))  # a marker: processed after the above
        await log.wait("jwt_rejected", len(bad) + 1)
        assert src.jwt_bundles().generation == 2
    assert log.count("jwt_stream_error") == 0


async def test_unimplemented_jwt_bundles_stop_only_the_jwt_stream(root_a: CA, sock: Path) -> None:
    # FakeWorkloadApi answers FetchJWTBundles with Unimplemented, as an agent with the JWT profile turned off
    # would: not retried (Workload Endpoint §6), and X.509 is served as ever.
    api = FakeWorkloadApi(response(svid_msg(root_a.leaf(), root_a)))
    log = EventLog()
    src = new_source(sock, log)
    async with serving(api, sock), running(src) as task:
        await src.wait_ready(WAIT)
        ev = await log.wait("jwt_stopped")
        assert "UNIMPLEMENTED" in ev.detail and "not retrying" in ev.detail
        assert not task.done() and src.jwt_bundles() is NO_JWT_BUNDLES
    assert log.count("jwt_backoff") == 0


async def test_jwt_stream_can_be_left_closed(root_a: CA, sock: Path) -> None:
    api = JwtFakeApi(response(svid_msg(root_a.leaf(), root_a)), jwt_response(jwt_key()))
    src = new_source(sock, EventLog(), fetch_jwt_bundles=False)
    async with serving(api, sock), running(src):
        await src.wait_ready(WAIT)
    assert api.jwt_calls == 0 and src.jwt_bundles() is NO_JWT_BUNDLES


# -- JWKS files beside the PEM files


def jwks_source(d: Path, log: Callable[[SourceEvent], None], files: dict[TrustDomain, str], **kw: Any
                ) -> PemFileSource:
    return PemFileSource(d / "tls.crt", d / "tls.key", d / "ca.crt", on_event=log,
                         jwt_bundles={td: d / name for td, name in files.items()}, **kw)


async def test_pem_jwks_files_reload_and_a_bad_file_is_kept_out(root_a: CA, tmp_path: Path) -> None:
    spire = EmbeddedSpire(parse_config(SPIRE_CONFIG, socket_dir=str(tmp_path)))  # keys only, not served
    write_set(tmp_path, root_a.leaf("spiffe://a.test/v1"), root_a)
    write_atomic(tmp_path / "partner.json", spire.jwt_bundle_json(PARTNER))
    log = EventLog()
    src = jwks_source(tmp_path, log, {EX: "example.json", PARTNER: "partner.json"})
    assert await src.poll_once()  # X.509 ready without the JWT bundles
    assert "missing file(s)" in log.events[-1].detail and log.events[-1].kind == "jwt_rejected"
    assert src.jwt_bundles() is NO_JWT_BUNDLES

    write_atomic(tmp_path / "example.json", spire.jwt_bundle_json())  # SPIFFE bundle form (use: jwt-svid)
    assert await src.poll_jwt_once()
    first = src.jwt_bundles()
    assert first.generation == 1 and set(first.bundles) == {EX, PARTNER}
    old = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
    assert ok(old, first) == CHECKOUT
    assert not await src.poll_jwt_once()  # unchanged

    spire.rotate_jwt_key()
    write_atomic(tmp_path / "example.json", jwks_json(spire.jwt_authorities()))  # plain JWK Set form
    assert await src.poll_jwt_once()
    second = src.jwt_bundles()
    assert second.generation == 2 and len(kids(second)) == 2
    assert ok(spire.mint_jwt_svid(CHECKOUT, ["inventory"]), second) == ok(old, second) == CHECKOUT
    assert kids(second, PARTNER) == kids(first, PARTNER)

    good_partner = (tmp_path / "partner.json").read_bytes()
    bad_files = [
        ("example.json", b"", "example.json: example.org: not a JSON JWK Set"),
        ("example.json", b'{"keys": [], "keys": []}', "duplicate member"),
        ("example.json", b'{"keys": "none"}', "MUST be an array"),
        ("partner.json", b"\xff\xfe garbage", "partner.json: partner.org: not a JSON JWK Set"),
        ("partner.json", b"[" * 100_000, "partner.org: not a JSON JWK Set"),
    ]
    for name, data, why in bad_files:
        write_atomic(tmp_path / name, data)
        assert not await src.poll_jwt_once()
        ev = log.events[-1]
        assert ev.kind == "jwt_rejected" and why in ev.detail and "keeping the last good set" in ev.detail, ev
        assert src.jwt_bundles() is second  # one bad file: the whole JWKS set waits, both trust domains
        write_atomic(tmp_path / "example.json", jwks_json(spire.jwt_authorities()))
        write_atomic(tmp_path / "partner.json", good_partner)

    # A bad JWKS file does not hold back a certificate rotation, nor a bad certificate the JWT bundles.
    write_atomic(tmp_path / "example.json", b"{")
    write_set(tmp_path, root_a.leaf("spiffe://a.test/v2"), root_a)
    assert await src.poll_once()
    assert str(src.current().default_svid.spiffe_id) == "spiffe://a.test/v2"  # type: ignore[union-attr]
    assert src.jwt_bundles() is second
    write_atomic(tmp_path / "tls.key", root_a.leaf().key_pem())  # mismatched key: X.509 set rejected
    spire.rotate_jwt_key()
    write_atomic(tmp_path / "example.json", spire.jwt_bundle_json())
    assert not await src.poll_once()
    assert src.jwt_bundles().generation == 3 and len(kids(src.jwt_bundles())) == 3
    assert log.count("rejected") == 1 and log.count("fatal") == 0


async def test_pem_jwks_spiffe_bundle_takes_only_jwt_svid_keys(root_a: CA, tmp_path: Path) -> None:
    k = jwt_key(EX)
    doc = json.loads(jwks_json([k], spiffe_bundle=True))
    x509_entry = {"kty": "EC", "use": "x509-svid", "crv": "P-256", "x": doc["keys"][0]["x"],
                  "y": doc["keys"][0]["y"], "kid": "x509-key"}
    no_use = {**doc["keys"][0], "kid": "no-use"}
    no_use.pop("use")
    doc["keys"] += [x509_entry, no_use, {"kty": "OKP", "use": "wit-svid", "kid": "w"}]
    write_set(tmp_path, root_a.leaf(), root_a)
    write_atomic(tmp_path / "ex.json", json.dumps({"spiffe_sequence": 7, **doc}).encode())
    log = EventLog()
    src = jwks_source(tmp_path, log, {EX: "ex.json"})
    await src.poll_once()
    bundle = src.jwt_bundles().bundles[EX]
    # Trust Domain and Bundle §4.2: a missing or another `use` is ignored, not an error.
    assert set(bundle.keys) == {k.kid} and bundle.sequence == 7 and bundle.rejected == ()


async def test_pem_jwks_reload_live_while_running(root_a: CA, tmp_path: Path) -> None:
    spire = EmbeddedSpire(parse_config(SPIRE_CONFIG, socket_dir=str(tmp_path)))
    write_set(tmp_path, root_a.leaf(), root_a)
    write_atomic(tmp_path / "ex.json", spire.jwt_bundle_json())
    log = EventLog()
    src = jwks_source(tmp_path, log, {EX: "ex.json"}, poll_interval=0.02)
    holder = JwtBundleHolder()
    holder.follow(src)
    async with running(src) as task:
        assert len(kids(await holder.wait_for(1, WAIT))) == 1
        write_atomic(tmp_path / "ex.json", b"\x00" * 64)
        await _first(task, log.wait("jwt_rejected"))
        active = spire.rotate_jwt_key()
        write_atomic(tmp_path / "ex.json", spire.jwt_bundle_json())
        assert kids(await holder.wait_for(2, WAIT)) == {active.kid}
    assert log.count("jwt_update") == 2

"""sidecar.sources against real sockets and real files.

The Workload API source talks to a tiny grpclib Workload API server defined here (serving certificates
from tests/pki.py) over a real unix socket / loopback TCP. The lead will switch these to the embedded
SPIRE once it lands. PEM sources read real files rewritten the way cert-manager and spiffe-helper do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

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
from sidecar.errors import SourceError
from sidecar.identity import SpiffeId, TrustDomain
from sidecar.sources import PemFileSource, SourceEvent, WorkloadApiSource, endpoint_from_env
from sidecar.svid import X509Context
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

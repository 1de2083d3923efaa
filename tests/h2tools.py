"""HTTP/2 and gRPC tools for the tests of the inbound HTTP/2 path (sidecar/h2conn.py): a grpcio test service
with the four call shapes, a grpcio client over mTLS, a raw HTTP/2 client over TLS (hpack + hyperframe) for
hostile frame sequences, and the inbound sidecar started with an `app_protocol`.

The test service exchanges raw bytes messages (grpcio's generic handlers with no serializers): the wire is
gRPC's own (length-prefixed messages, trailers, statuses) without a generated module to keep in step.
Plain functions and classes, like tests/helpers.py; grpcio's blocking API runs in worker threads
(`asyncio.to_thread`), never on the loop that runs the sidecar, and every call has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
import hpack
import hyperframe.frame as hf

from sidecar.audit import AuditLog
from sidecar.config import AppProtocol, AuditSettings, HostPort, InboundSettings, Limits, Timeouts
from sidecar.inbound import InboundServer, PolicyRef
from sidecar.metrics import Metrics
from sidecar.policy import compile_policy
from sidecar.tls import TlsContexts
from tests.example import CHECKOUT, policy_data
from tests.helpers import DEFAULT_TIMEOUTS, Pki, Sidecar
from tests.pki import Leaf

SERVICE = "inventory.v1.Inventory"
ADMIN = "inventory.v1.Admin"
CALL_TIMEOUT = 5.0  # every gRPC call's deadline (seconds)

# The running example plus gRPC: checkout may call every Inventory method; nobody may call Admin.
H2_POLICY = policy_data(
    {"name": "checkout-inventory-grpc", "action": "allow", "grpc": [f"{SERVICE}/*"], "callers": [CHECKOUT]},
    {"name": "no-admin-grpc", "action": "deny", "grpc": [f"{ADMIN}/*"], "callers": ["*"]},
    {"name": "checkout-test-api", "action": "allow", "methods": ["GET", "POST"], "paths": ["/api/**"],
     "callers": [CHECKOUT]},
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The gRPC app (grpcio server on an insecure port: an h2c app)


@dataclass
class GrpcApp:
    port: int
    server: grpc.Server
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (method, metadata) as received

    def stop(self) -> None:
        self.server.stop(grace=0.5).wait(5)


def start_grpc_app() -> GrpcApp:
    """The test service on 127.0.0.1 (ephemeral port): Inventory/{GetStock, WatchStock, ReserveMany, Chat}
    (unary, server streaming, client streaming, bidirectional) and Admin/Reset. Every call is recorded."""
    app = GrpcApp(0, grpc.server(ThreadPoolExecutor(max_workers=8)))

    def record(ctx: grpc.ServicerContext, name: str) -> None:
        app.calls.append((name, {k: str(v) for k, v in ctx.invocation_metadata()}))

    def get_stock(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        record(ctx, "GetStock")
        return b"stock:" + req

    def watch_stock(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        record(ctx, "WatchStock")
        for i in range(int(req or b"3")):
            yield b"tick%d" % i

    def reserve_many(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        record(ctx, "ReserveMany")
        got = list(reqs)
        return b"reserved:%d:%d" % (len(got), sum(len(r) for r in got))

    def chat(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        record(ctx, "Chat")
        for r in reqs:
            yield b"echo:" + r

    def reset(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        record(ctx, "Reset")
        return b"reset"

    app.server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(SERVICE, {
            "GetStock": grpc.unary_unary_rpc_method_handler(get_stock),
            "WatchStock": grpc.unary_stream_rpc_method_handler(watch_stock),
            "ReserveMany": grpc.stream_unary_rpc_method_handler(reserve_many),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        }),
        grpc.method_handlers_generic_handler(ADMIN, {"Reset": grpc.unary_unary_rpc_method_handler(reset)}),
    ))  # fmt: skip
    app.port = app.server.add_insecure_port("127.0.0.1:0")
    app.server.start()
    return app


# ---------------------------------------------------------------------------------------------------------
# The gRPC client (grpcio over mTLS; the sidecar's server SVID has the DNS SAN localhost for it)


def grpc_channel(pki: Pki, port: int, leaf: Leaf | None) -> grpc.Channel:
    """A channel to the sidecar as `leaf` (None: no client certificate)."""
    if leaf is None:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.root.bundle_pem())
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.root.bundle_pem(), private_key=leaf.key_pem(),
                                             certificate_chain=leaf.chain_pem())  # fmt: skip
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


async def in_thread(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Run a blocking grpcio call off the loop (the sidecar runs on it), under a deadline."""
    async with asyncio.timeout(timeout):
        return await asyncio.to_thread(fn)


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError `fn` raises (AssertionError if it succeeds)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


# ---------------------------------------------------------------------------------------------------------
# The sidecar


async def start_h2_sidecar(
    pki: Pki, app_port: int, *, app_protocol: AppProtocol, policy: dict[str, Any] = H2_POLICY,
    timeouts: Timeouts | None = None, limits: Limits | None = None, jwt_bundles: Any = None,
) -> Sidecar:  # fmt: skip
    """An InboundServer for inventory (mode http, ALPN h2 and http/1.1) in front of `app_port`, which speaks
    `app_protocol`; audit lines kept as dicts. The caller drains it."""
    metrics = Metrics()
    lines: list[dict[str, Any]] = []
    audit = AuditLog(AuditSettings(), write=lambda s: lines.append(json.loads(s)), metrics=metrics,
                     rng=lambda: 0.0)  # fmt: skip
    tls = TlsContexts(pki.context())
    ref = PolicyRef(compile_policy(policy, "test-policy"))
    settings = InboundSettings(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", app_port), app_protocol=app_protocol)
    server = InboundServer(settings, timeouts=timeouts or DEFAULT_TIMEOUTS, limits=limits or Limits(), tls=tls,
                           policy=ref, audit=audit, metrics=metrics, jwt_bundles=jwt_bundles)  # fmt: skip
    port = await server.start()
    return Sidecar(server, tls, ref, metrics, lines, port)


# ---------------------------------------------------------------------------------------------------------
# A raw HTTP/2 client over TLS (ALPN h2): frames as written, for hostile sequences

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/api/stock/1"), (":authority", "localhost")]


class RawH2:
    """Writes frames exactly as given (its HPACK encoder keeps the dynamic table in step); reads frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.closed = False

    @classmethod
    async def open(cls, pki: Pki, port: int, leaf: Leaf) -> RawH2:
        ctx = pki.client_ssl(leaf)
        ctx.set_alpn_protocols(["h2"])
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject) and ssl_object.selected_alpn_protocol() == "h2"
        raw = cls(reader, writer)
        raw.send(PREFACE + hf.SettingsFrame(0).serialize())
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def headers(self, sid: int, fields: list[tuple[str, str]] | list[tuple[bytes, bytes]], *, end_stream: bool = True,
                end_headers: bool = True) -> bytes:  # fmt: skip
        f = hf.HeadersFrame(sid)
        f.data = self.encoder.encode(fields)
        if end_headers:
            f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return bytes(f.serialize())

    @staticmethod
    def data(sid: int, payload: bytes, *, end_stream: bool = False) -> bytes:
        f = hf.DataFrame(sid)
        f.data = payload
        if end_stream:
            f.flags.add("END_STREAM")
        return bytes(f.serialize())

    @staticmethod
    def rst(sid: int, code: int = 0x8) -> bytes:
        f = hf.RstStreamFrame(sid)
        f.error_code = code
        return bytes(f.serialize())

    @staticmethod
    def continuation(sid: int, payload: bytes = b"", *, end_headers: bool = False) -> bytes:
        f = hf.ContinuationFrame(sid)
        f.data = payload
        if end_headers:
            f.flags.add("END_HEADERS")
        return bytes(f.serialize())

    async def frames(self, until: Callable[[list[hf.Frame]], bool] | None = None,
                     timeout: float = 5.0) -> list[hf.Frame]:  # fmt: skip
        """Frames received until `until(frames)` holds or the server closes (`closed` is then True). A server
        that does neither within `timeout` fails the test."""
        out: list[hf.Frame] = []
        try:
            async with asyncio.timeout(timeout):
                while until is None or not until(out):
                    while len(self.buf) >= 9:
                        f, length = hf.Frame.parse_frame_header(memoryview(self.buf[:9]))
                        if len(self.buf) < 9 + length:
                            break
                        f.parse_body(memoryview(self.buf[9 : 9 + length]))
                        self.buf = self.buf[9 + length :]
                        out.append(f)
                        if until is not None and until(out):
                            return out
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        self.closed = True
                        return out
                    self.buf += chunk
        except (ConnectionError, ssl.SSLError):
            self.closed = True
        except TimeoutError:
            got = [type(f).__name__ for f in out]
            raise AssertionError(f"no answer within {timeout}s; frames so far: {got}") from None
        return out

    def decode(self, f: hf.Frame) -> dict[str, str]:
        """A HEADERS frame's fields (one block, END_HEADERS set)."""
        assert isinstance(f, hf.HeadersFrame)
        return {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                for k, v in self.decoder.decode(bytes(f.data), raw=True)}  # fmt: skip

    def close(self) -> None:
        self.writer.close()


def of_stream(frames: list[hf.Frame], sid: int, kind: type[hf.Frame]) -> list[hf.Frame]:
    return [f for f in frames if isinstance(f, kind) and f.stream_id == sid]

"""sidecar.jwtsource against the embedded SPIRE over real unix sockets, on uvloop (the sidecar's loop):
JwtBundleHolder fed by a live FetchJWTBundles stream, and JwtSvidFetcher's FetchJWTSVID calls (caching,
shared fetches, renewal at half-life, deadlines, the expiry margin). py-spiffe's JwtSource is the outside
validator of the tokens the fetcher hands out. No token may show up in logs, events, reprs or errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from spiffe import JwtSource, JwtSvid
from spiffe import TrustDomain as PyTrustDomain

from sidecar.endpoint import UnixEndpoint
from sidecar.errors import SourceError
from sidecar.identity import SpiffeId
from sidecar.jwtsource import NO_JWT_BUNDLES, JwtBundleHolder, JwtBundles, JwtSvidFetcher
from sidecar.jwtsvid import JwtValidationCache
from sidecar.sources import SourceEvent, WorkloadApiSource
from spire.entries import parse_config
from spire.server import EmbeddedSpire

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
INVENTORY = "spiffe://example.org/ns/shop/sa/inventory"
WAIT = 15.0
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}")  # the base64url of '{"' starts every JWS header
CONFIG = f"""
trust_domain: example.org
entries:
  - spiffe_id: {CHECKOUT}
    socket: checkout.sock
  - spiffe_id: {INVENTORY}
    socket: inventory.sock
"""


class Events:
    """SourceEvents, awaitable by kind and count (no sleep polling)."""

    def __init__(self) -> None:
        self.events: list[SourceEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, ev: SourceEvent) -> None:
        self.events.append(ev)
        self._changed.set()

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)

    def of(self, kind: str) -> list[SourceEvent]:
        return [e for e in self.events if e.kind == kind]

    async def wait(self, kind: str, n: int = 1, timeout: float = WAIT) -> SourceEvent:
        async with asyncio.timeout(timeout):
            while self.count(kind) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.of(kind)[n - 1]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jwts-", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def spire_running(sock_dir: Path, **kw: Any) -> AsyncIterator[EmbeddedSpire]:
    async with EmbeddedSpire(parse_config(CONFIG, socket_dir=str(sock_dir), **kw)) as spire:
        yield spire


def fetcher_for(spire: EmbeddedSpire, events: Events, who: str = CHECKOUT, **kw: Any) -> JwtSvidFetcher:
    kw.setdefault("retry_initial", 0.1)
    return JwtSvidFetcher(UnixEndpoint(str(spire.socket_path_for(who))), on_event=events, **kw)


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def issued(caplog: pytest.LogCaptureFixture) -> int:
    """JWT-SVIDs the embedded SPIRE has minted (it logs each one, without the token)."""
    return sum(1 for r in caplog.records if r.name == "spire" and r.getMessage().startswith("issued JWT-SVID"))


# ----------------------------------------------------------------------------------------------- holder


async def test_holder_follows_a_live_bundle_stream(sock_dir: Path) -> None:
    async with spire_running(sock_dir) as spire:
        src = WorkloadApiSource(UnixEndpoint(str(spire.socket_path_for(INVENTORY))))
        holder = JwtBundleHolder()
        assert holder.current is NO_JWT_BUNDLES and holder.updated_at is None
        unsubscribe = holder.follow(src)
        task = asyncio.create_task(src.run())
        try:
            bundles, generation = await holder.wait_for(1, WAIT)
            assert generation == 1 and holder.updated_at is not None
            cache = JwtValidationCache()
            token = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
            got = cache.validate(token, audience="inventory", bundles=bundles, generation=generation, now=time.time())
            assert str(got.subject) == CHECKOUT
            unsubscribe()
            spire.rotate_jwt_key()
            assert (await asyncio.wait_for(_generation(src, 2), WAIT)).generation == 2
            assert holder.current.generation == 1  # unsubscribed: the holder keeps what it had
            with pytest.raises(SourceError, match=r"generation 1 after 0\.05s, waiting for 2"):
                await holder.wait_for(2, 0.05)
            holder.set(src.jwt_bundles())
            holder.set(JwtBundles(bundles, 1))  # older than the held one: ignored
            assert holder.current is src.jwt_bundles()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _generation(src: WorkloadApiSource, n: int) -> JwtBundles:
    got = asyncio.Event()
    unsubscribe = src.subscribe_jwt(lambda snap: got.set() if snap.generation >= n else None)
    try:
        while src.jwt_bundles().generation < n:
            await got.wait()
        return src.jwt_bundles()
    finally:
        unsubscribe()


# ----------------------------------------------------------------------------------------------- fetcher


async def test_get_fetches_once_then_serves_from_the_cache(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "spire")
    events = Events()
    async with spire_running(sock_dir) as spire, fetcher_for(spire, events) as fetcher:
        assert fetcher.cached("inventory") is None
        token = await fetcher.get("inventory")
        assert fetcher.cached("inventory") == token and await fetcher.get("inventory") == token
        assert issued(caplog) == 1
        c = claims(token)
        assert c["sub"] == CHECKOUT and c["aud"] == ["inventory"]
        [info] = fetcher.describe()
        assert info.spiffe_id == SpiffeId.parse(CHECKOUT) and info.audience == "inventory"
        assert info.kid == spire.jwt_authorities()[0].kid and info.expires_at == c["exp"]
        # Renewal at half of the lifetime, pulled earlier by at most 5% of it.
        lifetime = c["exp"] - c["iat"]
        assert c["iat"] + 0.45 * lifetime <= info.refresh_at <= c["iat"] + 0.5 * lifetime
        # Another audience is another token.
        other = await fetcher.get("reports")
        assert other != token and claims(other)["aud"] == ["reports"] and issued(caplog) == 2
        # The outside validator (py-spiffe, its own grpcio stream of inventory's bundles) accepts it.
        source = await asyncio.to_thread(JwtSource, socket_path=spire.endpoint_for(INVENTORY), timeout_in_seconds=WAIT)
        try:
            bundle = source.get_bundle_for_trust_domain(PyTrustDomain("example.org"))
            svid = JwtSvid.parse_and_validate(token, bundle, {"inventory"})
            assert str(svid.spiffe_id) == CHECKOUT
        finally:
            source.close()
    assert events.count("jwt_svid_fetched") == 2 and events.count("jwt_svid_error") == 0
    assert fetcher.cached("inventory") is None  # closed: tokens forgotten
    with pytest.raises(SourceError, match="the fetcher was closed"):
        await fetcher.get("inventory")


async def test_concurrent_callers_share_one_fetch(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "spire")
    events = Events()
    async with spire_running(sock_dir) as spire, fetcher_for(spire, events) as fetcher:
        impatient = asyncio.ensure_future(fetcher.get("inventory", timeout=0))
        callers = [asyncio.ensure_future(fetcher.get("inventory")) for _ in range(50)]
        tokens = await asyncio.gather(*callers)
        assert len(set(tokens)) == 1 and issued(caplog) == 1
        # One caller giving up (its own deadline) did not cancel the fetch the others were waiting for.
        with pytest.raises(SourceError, match=r"^JWT-SVID for audience 'inventory': no answer .* within 0s$"):
            await impatient
        # Cancelling a caller does not cancel the shared fetch either.
        waiter = asyncio.ensure_future(fetcher.get("other"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await fetcher.get("other") and issued(caplog) == 2
    assert events.count("jwt_svid_fetched") == 2


async def test_renewal_at_half_life_and_an_idle_audience_is_let_go(sock_dir: Path) -> None:
    events = Events()
    async with spire_running(sock_dir, jwt_ttl=4.0) as spire, fetcher_for(spire, events, min_remaining=1.0) as f:
        first = await f.get("inventory")
        t0 = time.monotonic()
        await events.wait("jwt_svid_fetched", 2)  # the renewal, in the background
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed <= 2.6, elapsed  # iat has whole seconds: half of 4 s, minus up to 1 s
        [renewed] = f.describe()
        assert renewed.expires_at > claims(first)["exp"]
        # Nobody used the renewed token: the next renewal is skipped; the held token stays until its margin.
        idle = await events.wait("jwt_svid_idle")
        assert "'inventory'" in idle.detail and events.count("jwt_svid_fetched") == 2
        second = f.cached("inventory")
        if second is None:  # past the renewed token's margin already: the next get fetches afresh
            second = await f.get("inventory")
            assert events.count("jwt_svid_fetched") == 3
        assert second != first and claims(second)["exp"] >= renewed.expires_at


async def test_a_failed_renewal_keeps_the_token_and_retries(sock_dir: Path) -> None:
    events = Events()
    spire = EmbeddedSpire(parse_config(CONFIG, socket_dir=str(sock_dir), jwt_ttl=6.0))
    await spire.start()
    try:
        async with fetcher_for(spire, events, min_remaining=1.0) as fetcher:
            token = await fetcher.get("inventory")
            await spire.stop()  # the agent is gone when the renewal is due
            err = await events.wait("jwt_svid_error")
            assert "does not exist" in err.detail and "'inventory'" in err.detail
            assert fetcher.cached("inventory") == token  # still usable: still handed out
            await spire.start()
            await events.wait("jwt_svid_fetched", 2)  # a retry got through
            renewed = fetcher.cached("inventory")
            assert renewed is not None and renewed != token
    finally:
        await spire.stop()


async def test_never_hands_out_a_token_near_its_expiry(sock_dir: Path) -> None:
    events = Events()
    async with spire_running(sock_dir, jwt_ttl=3.0) as spire:
        async with fetcher_for(spire, events) as fetcher:  # default margin: 5 s
            with pytest.raises(SourceError) as ei:
                await fetcher.get("inventory")
            assert re.fullmatch(
                r"JWT-SVID for audience 'inventory': the JWT-SVID expires in [0-9.]+s, within the 5s margin .*",
                str(ei.value),
            )
            assert fetcher.cached("inventory") is None and events.count("jwt_svid_error") == 1
        offset = [0.0]
        async with fetcher_for(spire, events, clock=lambda: time.time() + offset[0], min_remaining=1.0) as fetcher:
            token = await fetcher.get("inventory")
            exp = claims(token)["exp"]
            offset[0] = exp - 1.0 - time.time()  # our clock: exactly at the margin
            assert fetcher.cached("inventory") is None
            offset[0] -= 0.01
            assert fetcher.cached("inventory") == token
            offset[0] = exp - time.time()  # past the margin: a fresh fetch, which the margin refuses too
            with pytest.raises(SourceError, match="within the 1s margin"):
                await fetcher.get("inventory")


async def test_deadline_on_a_silent_workload_api(sock_dir: Path) -> None:
    path = sock_dir / "silent.sock"
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_unix_server(accept, path=str(path))
    events = Events()
    try:
        async with JwtSvidFetcher(UnixEndpoint(str(path)), timeout=0.5, on_event=events) as fetcher:
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"no answer from the Workload API at unix://.* within 0\.2s$"):
                await fetcher.get("inventory", timeout=0.2)
            assert time.monotonic() - t0 < 0.45
            # The shared fetch has its own deadline: it ends (and says so) without anyone waiting for it.
            err = await events.wait("jwt_svid_error", timeout=2.0)
            assert "within 0.5s" in err.detail
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"within 0\.5s$"):
                await fetcher.get("inventory")
            assert 0.4 < time.monotonic() - t0 < 1.5
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


async def test_errors_are_one_line_source_errors(sock_dir: Path) -> None:
    events = Events()
    async with spire_running(sock_dir) as spire:
        # Checkout's socket asked for inventory's identity: PermissionDenied, from SPIRE, as one line.
        f = fetcher_for(spire, events, spiffe_id=SpiffeId.parse(INVENTORY))
        async with f:
            with pytest.raises(SourceError) as ei:
                await f.get("inventory")
            assert str(ei.value) == (
                "JWT-SVID for audience 'inventory': PERMISSION_DENIED: no identity issued for the requested SPIFFE ID"
            )
            with pytest.raises(ValueError, match="audience"):
                await f.get("")
        async with fetcher_for(spire, events, spiffe_id=SpiffeId.parse(CHECKOUT)) as f:
            assert claims(await f.get("inventory"))["sub"] == CHECKOUT
    async with JwtSvidFetcher(UnixEndpoint(str(sock_dir / "absent.sock"))) as f:
        with pytest.raises(SourceError) as ei:
            await f.get("inventory")
        msg = str(ei.value)
        assert "absent.sock does not exist" in msg and "\n" not in msg


async def test_no_token_in_logs_events_reprs_or_errors(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: grpclib, asyncio, the embedded SPIRE
    events = Events()
    shown: list[str] = []
    tokens: list[str] = []
    spire = EmbeddedSpire(parse_config(CONFIG, socket_dir=str(sock_dir), jwt_ttl=6.0))
    await spire.start()
    try:
        src = WorkloadApiSource(UnixEndpoint(str(spire.socket_path_for(CHECKOUT))), on_event=events)
        holder = JwtBundleHolder()
        holder.follow(src)
        task = asyncio.create_task(src.run())
        async with fetcher_for(spire, events, min_remaining=1.0) as fetcher:
            tokens.append(await fetcher.get("inventory"))
            tokens.append(await fetcher.get("reports"))
            await holder.wait_for(1, WAIT)
            shown += [repr(fetcher), repr(fetcher.describe()), str(fetcher.describe()), repr(holder.current)]
            shown += [repr(s) for s in fetcher._slots.values()] + [repr(s.held) for s in fetcher._slots.values()]
            await spire.stop()
            await events.wait("jwt_svid_error")  # a renewal fails
            tokens += [t for t in (fetcher.cached("inventory"), fetcher.cached("reports")) if t]
            with pytest.raises(SourceError) as ei:
                await fetcher.get("fresh", timeout=1.0)
            shown.append(str(ei.value))
            await spire.start()
            await events.wait("jwt_svid_fetched", 3)
            tokens += [t for t in (fetcher.cached("inventory"), fetcher.cached("reports")) if t]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await spire.stop()
    shown += [caplog.text] + [repr(e) for e in events.events]
    assert len(set(tokens)) >= 3 and caplog.text and events.count("jwt_svid_fetched") >= 3
    for text in shown:
        assert JWT_LIKE.search(text) is None, text
        for token in tokens:
            assert token not in text and token.split(".")[2] not in text

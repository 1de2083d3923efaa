"""sidecar.jwtsvid against a live embedded SPIRE: tokens from py-spiffe's JwtSource, JWT bundles from the
FetchJWTBundles stream (grpcio), key rotation arriving while tokens are in flight."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import jwt
import pytest
from spiffe import JwtSource, JwtSvid
from spiffe import TrustDomain as PyTrustDomain
from spiffe._proto import workload_pb2 as spb
from spiffe._proto import workload_pb2_grpc as sgrpc

from sidecar.errors import JwtSvidError
from sidecar.identity import TrustDomain
from sidecar.jwtsvid import JwtBundle, JwtValidationCache, bundles_from_workload_api, validate
from spire.entries import parse_config
from spire.server import EmbeddedSpire

CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
INVENTORY = "spiffe://example.org/ns/shop/sa/inventory"
HEADER = ("workload.spiffe.io", "true")
DEADLINE = 20.0
CONFIG = f"""
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
    d = Path(tempfile.mkdtemp(prefix="jwt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class BundleStream:
    """A raw FetchJWTBundles stream over grpcio: each message parsed with `bundles_from_workload_api`."""

    def __init__(self, path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        stub = sgrpc.SpiffeWorkloadAPIStub(self.channel)  # type: ignore[no-untyped-call]
        self.stream = stub.FetchJWTBundles(spb.JWTBundlesRequest(), metadata=[HEADER], timeout=DEADLINE * 3)
        self.generation = 0

    async def next(self) -> tuple[int, dict[TrustDomain, JwtBundle]]:
        msg = await asyncio.to_thread(next, self.stream)
        self.generation += 1
        return self.generation, bundles_from_workload_api(dict(msg.bundles))

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def reason(token: str, bundles: Any, now: float | None = None, audience: str = "inventory") -> str:
    with pytest.raises(JwtSvidError) as ei:
        validate(token, audience=audience, bundles=bundles, now=now or dt.datetime.now(dt.UTC).timestamp())
    return ei.value.reason


async def test_py_spiffe_tokens_validate_against_streamed_bundles(sock_dir: Path) -> None:
    async with EmbeddedSpire(parse_config(CONFIG, socket_dir=str(sock_dir))) as spire:
        source = await asyncio.to_thread(JwtSource, socket_path=spire.endpoint_for(CHECKOUT),
                                         timeout_in_seconds=DEADLINE)
        stream = BundleStream(spire.socket_path_for(INVENTORY))
        try:
            svid = await asyncio.to_thread(source.fetch_svid, {"inventory"}, timeout=DEADLINE)
            _, bundles = await stream.next()
            assert set(bundles) == {TrustDomain("example.org")}
            # The bundle we parse holds exactly the keys py-spiffe parsed from its own stream.
            theirs = source.get_bundle_for_trust_domain(PyTrustDomain("example.org"))
            assert theirs is not None
            assert set(bundles[TrustDomain("example.org")].keys) == set(theirs.jwt_authorities)
            now = dt.datetime.now(dt.UTC).timestamp()
            got = validate(svid.token, audience="inventory", bundles=bundles, now=now)
            assert str(got.subject) == CHECKOUT and got.audience == ("inventory",)
            # py-spiffe's own validator agrees on the same token and bundle.
            assert str(JwtSvid.parse_and_validate(svid.token, theirs, {"inventory"}).spiffe_id) == CHECKOUT
            assert reason(svid.token, bundles, audience="checkout") == "wrong_audience"
            # A partner.org token: trusted by checkout (federated), not by inventory.
            partner = spire.mint_jwt_svid("spiffe://partner.org/pay", ["inventory"])
            assert reason(partner, bundles) == "untrusted_trust_domain"
            federated = BundleStream(spire.socket_path_for(CHECKOUT))
            try:
                _, fed_bundles = await federated.next()
            finally:
                federated.close()
            assert str(validate(partner, audience="inventory", bundles=fed_bundles, now=now).subject) == (
                "spiffe://partner.org/pay"
            )
        finally:
            stream.close()
            source.close()


async def test_bundles_rotate_live_and_the_cache_follows(sock_dir: Path) -> None:
    """A JWT key rotation reaches the stream while tokens of both keys are in flight: both validate; once the
    old key's last token has expired the key leaves the next bundle and that token is refused, cached or not."""
    t = [dt.datetime.now(dt.UTC)]
    async with EmbeddedSpire(parse_config(CONFIG, socket_dir=str(sock_dir)), now=lambda: t[0]) as spire:
        stream = BundleStream(spire.socket_path_for(INVENTORY))
        cache = JwtValidationCache()
        try:
            gen, bundles = await stream.next()
            old = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
            now = t[0].timestamp()
            assert str(cache.validate(old, audience="inventory", bundles=bundles, generation=gen, now=now).subject) \
                == CHECKOUT
            spire.rotate_jwt_key()
            gen, bundles = await stream.next()
            new = spire.mint_jwt_svid(CHECKOUT, ["inventory"])
            kids = set(bundles[TrustDomain("example.org")].keys)
            assert len(kids) == 2 and {jwt.get_unverified_header(x)["kid"] for x in (old, new)} == kids
            for token in (old, new):
                cache.validate(token, audience="inventory", bundles=bundles, generation=gen, now=now)
            # The old key leaves once its token has expired (exp is what SPIRE counts, not exp + leeway).
            old_exp = jwt.decode(old, options={"verify_signature": False})["exp"]
            t[0] = dt.datetime.fromtimestamp(old_exp, dt.UTC)
            spire.tick()
            gen, bundles = await stream.next()
            assert len(bundles[TrustDomain("example.org")].keys) == 1
            with pytest.raises(JwtSvidError, match="unknown_kid"):
                cache.validate(old, audience="inventory", bundles=bundles, generation=gen, now=old_exp + 1)
            assert reason(old, bundles, now=old_exp + 1) == "unknown_kid"
            assert cache.validate(new, audience="inventory", bundles=bundles, generation=gen, now=old_exp + 1)
        finally:
            stream.close()

"""sidecar.endpoint: SPIFFE_ENDPOINT_SOCKET parsing (Workload Endpoint §4; spec notes §3.1 table)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.endpoint import TcpEndpoint, UnixEndpoint, endpoint_from_env, parse_endpoint
from sidecar.errors import EndpointError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp://1.2.3.4:5", TcpEndpoint("1.2.3.4", 5)),
        ("tcp://127.0.0.1:8000", TcpEndpoint("127.0.0.1", 8000)),
        ("tcp://[::1]:8081", TcpEndpoint("::1", 8081)),
        ("TCP://10.0.0.1:65535", TcpEndpoint("10.0.0.1", 65535)),
        ("unix:///tmp/spire-agent/public/api.sock", UnixEndpoint("/tmp/spire-agent/public/api.sock")),
        ("unix:/run/spire/sockets/agent.sock", UnixEndpoint("/run/spire/sockets/agent.sock")),
        ("unix:///run/my%20dir/api.sock", UnixEndpoint("/run/my dir/api.sock")),
    ],
)
def test_valid(value: str, expected: UnixEndpoint | TcpEndpoint) -> None:
    assert parse_endpoint(value) == expected


# Every row of spec notes §3.1's go-spiffe table, plus our stricter unix://foo and more.
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("tcp://1.2.3.4", "must include a port"),
        ("tcp://1.2.3.4:", "must include a port"),
        ("tcp://foo", "must be an IP address"),
        ("tcp://foo:5", "must be an IP address"),
        ("tcp://localhost:8000", "must be an IP address"),
        ("tcp://1.2.3.4:5/path", "must not include a path"),
        ("tcp://1.2.3.4:5/", "must not include a path"),
        ("tcp://1.2.3.4:5?x", "must not include a query"),
        ("tcp://1.2.3.4:5#x", "must not include a fragment"),
        ("tcp://john:doe@1.2.3.4:5/path", "must not include"),
        ("tcp://john:doe@1.2.3.4:5", "userinfo"),
        ("tcp:opaque", "must not be opaque"),
        ("tcp://", "must include a host"),
        ("tcp://:5", "must include a host"),
        ("tcp://1.2.3.4:0", "1 to 65535"),
        ("tcp://1.2.3.4:65536", "1 to 65535"),
        ("tcp://1.2.3.4:http", "1 to 65535"),
        ("tcp://::1:80", "brackets"),
        ("tcp://[::1]", "must include a port"),
        ("tcp://[::1:80", "unterminated"),
        ("tcp://[fe80::1%25eth0]:80", "plain IP"),
        ("tcp://01.2.3.4:5", "must be an IP address"),
        ("unix://", "absolute socket path"),
        ("unix:///", "absolute socket path"),
        ("unix:opaque", "must not be opaque"),
        ("unix:relative/path.sock", "must not be opaque"),
        ("unix://foo?whatever", "must not include a query"),
        ("unix://foo#whatever", "must not include a fragment"),
        ("unix:///tmp/a.sock?x=1", "must not include a query"),
        ("unix://john:doe@foo/path", "must not have an authority"),
        ("unix://foo", "must not have an authority"),
        ("unix://foo/bar.sock", "must not have an authority"),
        ("unix:///tmp/a%00b", "NUL"),
        ("unix:///tmp/a%zz", "percent-encoding"),
        ("blah", "scheme"),
        ("", "is empty"),
        ("/tmp/agent.sock", "scheme"),
        ("http://1.2.3.4:5", "scheme must be"),
        ("npipe:spire-agent\\public\\api", "scheme must be"),
        (" unix:///tmp/a.sock", "whitespace"),
        ("unix:///tmp/a.sock\n", "whitespace"),
        ("unix:///tmp/ä.sock", "non-ASCII"),
    ],
)
def test_invalid(value: str, why: str) -> None:
    with pytest.raises(EndpointError) as ei:
        parse_endpoint(value)
    msg = str(ei.value)
    assert why in msg
    assert "\n" not in msg


def test_forms() -> None:
    u = parse_endpoint("unix:/tmp/x.sock")
    assert isinstance(u, UnixEndpoint)
    assert str(u) == "unix:///tmp/x.sock" == u.grpc_target()
    t = parse_endpoint("tcp://127.0.0.1:8081")
    assert str(t) == "tcp://127.0.0.1:8081" and t.grpc_target() == "127.0.0.1:8081"
    t6 = parse_endpoint("tcp://[0:0::1]:8081")
    assert isinstance(t6, TcpEndpoint)
    assert t6.host == "::1" and str(t6) == "tcp://[::1]:8081" and t6.grpc_target() == "[::1]:8081"
    assert parse_endpoint(str(t6)) == t6 and parse_endpoint(str(u)) == u


def test_from_env() -> None:
    assert endpoint_from_env({"SPIFFE_ENDPOINT_SOCKET": "unix:///a/b.sock"}) == UnixEndpoint("/a/b.sock")
    with pytest.raises(EndpointError, match="SPIFFE_ENDPOINT_SOCKET is not set"):
        endpoint_from_env({})
    with pytest.raises(EndpointError):
        endpoint_from_env({"SPIFFE_ENDPOINT_SOCKET": "unix://foo"})


@given(st.text(max_size=60))
def test_never_crashes(value: str) -> None:
    try:
        ep = parse_endpoint(value)
    except EndpointError:
        return
    assert parse_endpoint(str(ep)) == ep

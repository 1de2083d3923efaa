"""Messages that tell a newcomer what to do (pure): did-you-mean, an unreachable Workload API, a policy that
enforces nothing.

`did_you_mean` is for every "must be one of" problem: `action: ALLOW` (Istio's spelling) gets
"must be 'allow' or 'deny' (did you mean 'allow'?)". sidecar/policy.py should call it where it reports a
bad `action`, `mode` or rule key (`from .hints import did_you_mean` works there: this module imports
policy.py only for type checking).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .endpoint import TcpEndpoint, UnixEndpoint

if TYPE_CHECKING:  # policy.py imports this module for did_you_mean: no import cycle at run time
    from .policy import Policy

__all__ = ["did_you_mean", "policy_warnings", "workload_api_unreachable"]


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """`" (did you mean 'allow'?)"` when `value` is a near miss of one of `choices` (other case, a typo,
    surrounding blanks), else `""`. Ready to append to a problem message."""
    if not isinstance(value, str) or not value:
        return ""
    options = list(choices)
    folded = value.strip().lower()
    for choice in options:
        if choice.lower() == folded and choice != value:
            return f" (did you mean {choice!r}?)"
    close = difflib.get_close_matches(folded, options, n=1, cutoff=0.75)
    if close and close[0] != value:
        return f" (did you mean {close[0]!r}?)"
    return ""


def workload_api_unreachable(endpoint: UnixEndpoint | TcpEndpoint, exc: OSError) -> str:
    """What a failed connection to the Workload API means and what to check, naming the socket."""
    if isinstance(endpoint, UnixEndpoint):
        path = endpoint.path
        where = f"Workload API socket {path}"
        if exc.errno == errno.ENOENT:
            return (
                f"{where} does not exist: is the SPIRE agent running on this node, and is its socket "
                "mounted here (in Kubernetes: the SPIFFE CSI driver volume, csi.spiffe.io)? The path comes "
                "from svid_source.workload_api.socket or SPIFFE_ENDPOINT_SOCKET"
            )
        if exc.errno == errno.ECONNREFUSED:
            return f"nothing accepts connections on {where}: the SPIRE agent is not running (a stale socket file)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (
                f"permission denied on {where}: this user (uid/gid) cannot open it; check the socket's and its "
                "directory's permissions"
            )
        if exc.errno == errno.ENOTDIR:
            return f"{where}: a part of the path is not a directory"
        return f"cannot connect to {where}: {exc.strerror or exc}"
    target = f"Workload API at {endpoint.host}:{endpoint.port}"
    if exc.errno == errno.ECONNREFUSED:
        return f"connection refused by the {target}: is the SPIRE agent listening there?"
    return f"cannot connect to the {target}: {exc.strerror or exc}"


def policy_warnings(policy: Policy) -> list[str]:
    """Things about a policy that compile but rarely mean what the author wanted."""
    out: list[str] = []
    if policy.mode == "audit" and not policy.rules:
        out.append(
            "the policy is in audit mode and has no rules: EVERY REQUEST IS FORWARDED (each logged as "
            "would-deny); nothing is enforced"
        )
    elif policy.mode == "audit":
        out.append("the policy is in audit mode: denials are logged as would-deny and the requests forwarded")
    return out

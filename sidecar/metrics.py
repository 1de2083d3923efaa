"""Prometheus metrics of one sidecar process, in their own registry (injected, never global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency buckets in seconds: sub-millisecond resolution for a local proxy.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """All series the sidecar exports. Label values are bounded sets (rule names, reason codes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "spiffe_sidecar_requests",
            "Authorization decisions on the inbound listener.",
            ["listener", "decision", "rule", "mode"],
            registry=r,
        )
        self.request_latency = Histogram(
            "spiffe_sidecar_request_duration_seconds",
            "Time from request head to the end of the response, per listener.",
            ["listener"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handshake_failures = Counter(
            "spiffe_sidecar_handshake_failures",
            "TLS handshakes or SPIFFE peer checks that failed, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.bad_requests = Counter(
            "spiffe_sidecar_bad_requests", "Requests rejected with 4xx before authorization.", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "spiffe_sidecar_upstream_errors", "Failures talking to the next hop.", ["listener", "kind"], registry=r
        )
        self.peer_stalls = Counter(
            "spiffe_sidecar_peer_stalls",
            "Exchanges cut off because the peer stopped reading the response (kind=write) or stopped "
            "sending its request body (kind=request_body); see timeouts.write_stall/request_body_stall.",
            ["listener", "kind"],
            registry=r,
        )
        self.open_connections = Gauge(
            "spiffe_sidecar_open_connections", "Open downstream connections.", ["listener"], registry=r
        )
        self.connection_limit_hits = Counter(
            "spiffe_sidecar_connection_limit_hits",
            "Connections refused at the connection limit.",
            ["listener"],
            registry=r,
        )
        self.svid_expiry = Gauge(
            "spiffe_sidecar_svid_expiry_timestamp_seconds", "Expiry time of the current default X.509-SVID.", registry=r
        )
        self.rotations = Counter(
            "spiffe_sidecar_svid_rotations", "New X.509 contexts (SVID or bundle updates) applied.", registry=r
        )
        self.policy_reloads = Counter(
            "spiffe_sidecar_policy_reloads", "Policy reload attempts, by result.", ["result"], registry=r
        )
        self.audit_dropped = Counter(
            "spiffe_sidecar_audit_lines_dropped", "Deny audit lines dropped by the rate limit.", registry=r
        )
        # Outbound (the app's own calls, mTLS to the target).
        self.outbound_handshakes = Counter(
            "spiffe_sidecar_outbound_handshakes",
            "mTLS handshakes completed to outbound targets (each new pooled connection is one).",
            ["route"],
            registry=r,
        )
        self.outbound_server_id_mismatches = Counter(
            "spiffe_sidecar_outbound_server_id_mismatches",
            "Outbound targets that presented a valid SVID with the wrong SPIFFE ID.",
            ["route"],
            registry=r,
        )
        self.outbound_pool_connections = Gauge(
            "spiffe_sidecar_outbound_pool_connections",
            "Pooled mTLS connections (idle + leased + connecting) per outbound route.",
            ["route"],
            registry=r,
        )
        # Kubernetes mode (sidecar/bypass.py, sidecar/probes.py).
        self.app_port_exposed = Gauge(
            "spiffe_sidecar_app_port_exposed",
            "1 while the app port answers on the pod IP (callers could bypass the sidecar), else 0.",
            registry=r,
        )
        self.probe_requests = Counter(
            "spiffe_sidecar_probe_requests",
            "Requests on the probe port, by route (a configured probe path, sidecar-healthz/readyz, or "
            "not-found) and result (the status class, or upstream-error).",
            ["route", "result"],
            registry=r,
        )

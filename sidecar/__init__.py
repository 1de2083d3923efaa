"""spiffe-sidecar: a per-pod SPIFFE mTLS sidecar with per-path caller allowlists."""

__version__ = "0.1.0"

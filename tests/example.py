"""The running example (DESIGN.md), in one place for every test: checkout may call inventory's
`GET /api/stock/*`; nobody may call inventory's `/admin/**`; reporting may call nothing.

Plain constants, not fixtures: tests use them at import time (parametrize lists, f-strings of configs).
The fixtures built from them (PKI, recording app) live in tests/conftest.py.
"""

from __future__ import annotations

TD = "example.org"
CHECKOUT = f"spiffe://{TD}/ns/shop/sa/checkout"
INVENTORY = f"spiffe://{TD}/ns/shop/sa/inventory"
REPORTING = f"spiffe://{TD}/ns/shop/sa/reporting"

# Inventory's policy as a policy file (the same rules as config/inventory-policy.yaml).
POLICY = f"""\
rules:
  - name: checkout-reads-stock
    action: allow
    methods: [GET]
    paths: ["/api/stock/*"]
    callers: ["{CHECKOUT}"]
  - name: no-admin
    action: deny
    paths: ["/admin/**"]
    callers: ["*"]
"""

# A good update: reporting may now read stock too.
POLICY_WITH_REPORTING = (
    POLICY
    + f"""\
  - name: reporting-reads-stock
    action: allow
    methods: [GET]
    paths: ["/api/stock/*"]
    callers: ["{REPORTING}"]
"""
)

# Another good update: checkout may also read orders.
POLICY_WITH_ORDERS = (
    POLICY
    + f"""\
  - name: checkout-orders
    action: allow
    methods: [GET]
    paths: ["/api/orders/*"]
    callers: ["{CHECKOUT}"]
"""
)

# A bad update (an unknown key): it must be rejected and the last good policy kept.
BROKEN_POLICY = """\
rules:
  - name: everyone-everything
    action: allow
    paths: ["/**"]
    callers: ["*"]
    colour: red
"""

# The same policy as data (what `compile_policy` takes); `extra` rules are appended.
CHECKOUT_READS_STOCK = {
    "name": "checkout-reads-stock", "action": "allow", "methods": ["GET"], "paths": ["/api/stock/*"],
    "callers": [CHECKOUT],
}  # fmt: skip
NO_ADMIN = {"name": "no-admin", "action": "deny", "paths": ["/admin/**"], "callers": ["*"]}


def policy_data(*extra: dict[str, object]) -> dict[str, object]:
    """The running example's rules as data, plus `extra` rules (allow rules a test needs)."""
    return {"rules": [CHECKOUT_READS_STOCK, *extra, NO_ADMIN]}

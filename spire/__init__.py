"""Embedded development SPIRE: a CA, registration entries and a SPIFFE Workload API server.

For laptops, CI, demos and tests (think `vault server -dev`); production uses a real SPIRE agent.
"""

from .ca import IssuedX509Svid
from .entries import RegistrationEntry, Selector, SpireConfig, load_config, parse_config
from .server import EmbeddedSpire, SpireThread

__all__ = [
    "EmbeddedSpire",
    "IssuedX509Svid",
    "RegistrationEntry",
    "Selector",
    "SpireConfig",
    "SpireThread",
    "load_config",
    "parse_config",
]

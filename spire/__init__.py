"""Embedded development SPIRE: a CA, registration entries and a SPIFFE Workload API server.

For laptops, CI, demos and tests (think `vault server -dev`); production uses a real SPIRE agent.
"""

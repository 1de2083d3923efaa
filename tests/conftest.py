"""Fixtures shared by the whole suite. Helpers that are not fixtures live in plain modules beside this one:
tests/example.py (the running example's IDs and policy), tests/helpers.py (in-process: PKI, recording app,
outside clients, an inbound listener), tests/processes.py (the sidecar as a subprocess, fault tools),
tests/pki.py (certificates).

Event loop: a module marked `pytestmark = pytest.mark.uvloop` runs its async tests on uvloop, the loop the
sidecar ships with, so that the listener under test uses the same transports as in production.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

import pytest
import uvloop

if TYPE_CHECKING:
    from tests.helpers import App, Pki

# tests/helpers.py imports the data plane: imported inside the fixtures, so that the unit tests of the pure
# core still collect while a data-plane module is being rewritten.


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "uvloop: run the async tests on uvloop (the sidecar's event loop)")
    if os.environ.get("SPIFFE_SIDECAR_EXPECT_COMPILED") == "1":
        # `make test` runs the data-plane tests a second time on the mypyc build: make sure they do.
        import sidecar.proxy

        if not sidecar.proxy.__file__ or not sidecar.proxy.__file__.endswith(".so"):
            pytest.exit(f"expected the compiled data plane, loaded {sidecar.proxy.__file__}", returncode=3)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("uvloop") is not None:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The running example's certificates (one root and intermediate per test module)."""
    from tests.helpers import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def app() -> AsyncIterator[App]:
    """The recording app behind the sidecar (tests/helpers.py `recording_app`)."""
    from tests.helpers import running_app

    async with running_app() as state:
        yield state

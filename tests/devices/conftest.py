"""Fixtures for the devices tests: recorded NVML snapshots (copied from shared/fixtures/gpu) behind the fake."""

from __future__ import annotations

import pytest

from poolmgr.devices import FakeNvmlBackend, Inventory, discover

from .gpu_fixtures import H100, HETERO


@pytest.fixture
def h100_backend() -> FakeNvmlBackend:
    return FakeNvmlBackend(H100)


@pytest.fixture
def hetero_backend() -> FakeNvmlBackend:
    return FakeNvmlBackend(HETERO)


@pytest.fixture
def h100(h100_backend: FakeNvmlBackend) -> Inventory:
    return discover(h100_backend)


@pytest.fixture
def hetero(hetero_backend: FakeNvmlBackend) -> Inventory:
    return discover(hetero_backend)

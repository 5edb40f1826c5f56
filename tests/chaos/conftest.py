"""Fixtures for the chaos tests: rigs whose `serve` processes and engines are always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.chaos._rig import Rig


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(db_url: str, **env: str) -> Rig:
        rig = Rig(db_url, **env)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.cleanup()

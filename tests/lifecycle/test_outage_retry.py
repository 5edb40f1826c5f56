"""RetryingRegistry.call (lifecycle/outage.py): a call that works runs once, with no retry loop; a database
outage is waited out with exponential waits (0.2, 0.4, 0.8 … s, at most 5 s), each wait said in one warning;
any other error comes out at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from poolmgr.lifecycle.outage import RetryingRegistry


class _Flaky:
    """Fails with a lost database `failures` times, then answers."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.error = error or OperationalError("SELECT 1", None, Exception("server closed the connection"))

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits asked for (tenacity's and the first one), taken at once."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        asked.append(round(seconds, 3))
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return asked


def test_a_call_that_works_runs_once_without_waiting(waits: list[float]) -> None:
    flaky = _Flaky(0)
    assert asyncio.run(RetryingRegistry(None).call(flaky)) == "answer"  # type: ignore[arg-type]
    assert flaky.calls == 1 and waits == []


def test_an_outage_is_waited_out_with_the_same_exponential_waits(
    waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolmgr.reconciler")
    flaky = _Flaky(6)
    assert asyncio.run(RetryingRegistry(None).call(flaky)) == "answer"  # type: ignore[arg-type]
    assert flaky.calls == 7 and waits == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    waiting = [r.getMessage() for r in caplog.records if "waiting for the database" in r.getMessage()]
    assert [m.split("(attempt ")[1].split(",")[0] for m in waiting] == ["1", "2", "3", "4", "5", "6"]
    assert "next try in 0.2 s" in waiting[0] and "server closed the connection" in waiting[0]
    assert any("the database answers again" in r.getMessage() and "attempt 7" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_an_error_that_is_not_an_outage_comes_out_at_once(waits: list[float]) -> None:
    flaky = _Flaky(1, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(RetryingRegistry(None).call(flaky))  # type: ignore[arg-type]
    assert flaky.calls == 1 and waits == []

"""Supervising a crashed pool, a part of its worker: back off and retry, roll a failed reload back, open the
circuit breaker (threshold, failed half-open trial, restart storm) and try again once its timeout has passed.
The decisions are the restart policy's (policy.py, pure); this part waits on the injected clock and fires them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from poolmgr.inflight import Reload
from poolmgr.lifecycle.effects import BackedOff, BreakerOpened, Retried, RolledBack, Stopped, TrialStarted
from poolmgr.lifecycle.outage import RetryingRegistry
from poolmgr.lifecycle.policy import CrashDecision, RestartPolicy
from poolmgr.lifecycle.port import PoolPort
from poolmgr.states import DesiredState, PoolState, Trigger
from poolmgr.store import Effect, EventData, PoolView

log = logging.getLogger("poolmgr.pool")
S = PoolState


class Supervisor:
    def __init__(
        self,
        port: PoolPort,
        policy: RestartPolicy,
        store: RetryingRegistry,
        *,
        preload: Callable[[PoolView], Awaitable[None]],
    ) -> None:
        self.port = port
        self.policy = policy
        self.store = store
        self._preload = preload  # the worker's preload step: a retry goes on without a wake-up and re-read

    async def _stopped_instead(self, view: PoolView) -> bool:
        """An operator stopped the pool meanwhile: it stops instead of restarting."""
        if view.desired_state is not DesiredState.STOPPED:
            return False
        await self.port.fire(Stopped(), expect=[view.state])
        return True

    async def restart_chain(self, view: PoolView) -> Callable[[PoolView], Effect | None] | None:
        """For a crash about to be recorded, with a 0 ms backoff: what follows it in the same transaction —
        back_off (0 ms), then retry — decided by the restart policy on the row as the crash leaves it (each
        with its audit row). None, or a chain that stops early, when a wait, the breaker (threshold, trial,
        storm), a rollback or a stop comes next: `on_crashed` decides those after the crash's commit."""
        if not self.policy.restarts_at_once() or self._not_restarting(view):
            return None
        now = self.port.clock.now()
        since = self.policy.storm_window_start(now)
        restarts = await self.store.call(self.store.registry.count_events, view.id, trigger=Trigger.RETRY, since=since)

        def then(row: PoolView) -> Effect | None:
            if self._not_restarting(row):
                return None
            if row.state is S.CRASHED:
                decision = self.policy.on_crash(row, now, restarts_in_window=restarts)
                if decision.action == "back_off" and decision.delay_ms == 0:
                    return BackedOff(0, decision.next_restart_at or now, decision.reason)
            elif row.state is S.BACKOFF:
                return Retried()
            return None

        return then

    @staticmethod
    def _not_restarting(view: PoolView) -> bool:
        """A stop, a removal or a reload's rollback comes next, not a restart (on_crashed decides those)."""
        return (
            view.desired_state is DesiredState.STOPPED
            or view.removed_at is not None
            or isinstance(view.pending_op, Reload)
        )

    def restarted_at_once(self, crashed: PoolView, retried: PoolView) -> None:
        """The log lines of a back_off and retry chained to the crash (`restart_chain`)."""
        log.info("pool %s backing off 0 ms", crashed.id, extra=self.port.log_extra(
            crashed, backoff_ms=0, restart_count=crashed.restart_count, last_error=retried.last_error,
            next_restart_at=self.port.clock.now().isoformat()))  # fmt: skip
        extra = self.port.log_extra(retried, restart_count=retried.restart_count)
        log.info("pool %s restarting", crashed.id, extra=extra)

    async def on_crashed(self, view: PoolView) -> None:
        if await self._stopped_instead(view):
            return
        if isinstance(view.pending_op, Reload):
            await self._rollback(view, view.pending_op)
            return
        now = self.port.clock.now()
        since = self.policy.storm_window_start(now)
        restarts = await self.store.call(self.store.registry.count_events, view.id, trigger=Trigger.RETRY, since=since)
        decision = self.policy.on_crash(view, now, restarts_in_window=restarts)
        if decision.action == "back_off":
            await self._back_off(view, decision)
            return
        if decision.storm:
            storm = EventData(kind="restart_storm", reason=decision.reason, detail={"restarts_in_window": restarts})
            await self.store.note_once(view.id, storm)
            log.critical(
                "pool %s: %s", view.id, decision.reason,
                extra=self.port.log_extra(view, restart_count=view.restart_count, last_error=view.last_error),
            )  # fmt: skip
        await self._open_breaker(view, decision)

    async def _back_off(self, view: PoolView, decision: CrashDecision) -> None:
        due = decision.next_restart_at or self.port.clock.now()
        backing = await self.port.fire(BackedOff(decision.delay_ms, due, decision.reason), expect=[S.CRASHED])
        log.info(
            "pool %s backing off %d ms", view.id, decision.delay_ms,
            extra=self.port.log_extra(
                view, backoff_ms=decision.delay_ms, restart_count=view.restart_count, last_error=view.last_error,
                next_restart_at=due.isoformat(),
            ),
        )  # fmt: skip
        if decision.delay_ms == 0:
            await self.on_backoff(backing)  # no delay: restart without a wake-up and re-read

    async def _open_breaker(self, view: PoolView, decision: CrashDecision) -> None:
        until = decision.breaker_until or self.port.clock.now()
        opened = BreakerOpened(until, decision.breaker_timeout_s, decision.reason)
        await self.port.fire(opened, expect=[S.CRASHED])
        log.critical(
            "pool %s circuit breaker open: %s", view.id, decision.reason,
            extra=self.port.log_extra(
                view, last_error=view.last_error, restart_count=view.restart_count, from_state=view.state.value,
                to_state=S.BREAKER_OPEN.value, consecutive_failures=view.consecutive_failures,
            ),
        )  # fmt: skip

    async def _rollback(self, view: PoolView, op: Reload) -> None:
        await self.port.fire(RolledBack(op), expect=[S.CRASHED, S.BACKOFF])
        log.warning("pool %s reload failed; rolling back to %s", view.id, op.old_spec.model,
                    extra=self.port.log_extra(view))  # fmt: skip

    async def on_backoff(self, view: PoolView) -> None:
        if await self._stopped_instead(view):
            return
        due = view.next_restart_at or self.port.clock.now()
        wait_s = (due - self.port.clock.now()).total_seconds()
        if wait_s > 0:
            await self.port.wait(wait_s)
            return
        retried = await self.port.fire(Retried(), expect=[S.BACKOFF])
        log.info("pool %s restarting", view.id, extra=self.port.log_extra(view, restart_count=retried.restart_count))
        await self._preload(retried)

    async def on_breaker_open(self, view: PoolView) -> None:
        if await self._stopped_instead(view):
            return
        due = view.breaker_until or self.port.clock.now()
        wait_s = (due - self.port.clock.now()).total_seconds()
        if wait_s > 0:
            await self.port.wait(wait_s)
            return
        trial = await self.port.fire(TrialStarted(), expect=[S.BREAKER_OPEN])
        log.info(
            "pool %s breaker half-open: trial start", view.id,
            extra=self.port.log_extra(
                view, restart_count=trial.restart_count, from_state=view.state.value, to_state=S.PRELOADING.value,
                consecutive_failures=view.consecutive_failures,
            ),
        )  # fmt: skip


__all__ = ["Supervisor"]

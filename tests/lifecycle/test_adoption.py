"""Re-adoption after a poolmgr restart (invariants 2-4): the reconciler meets engines the previous poolmgr left.

Each test sets up what a dead poolmgr left behind — registry rows and real engine processes (the fake
llama-server, started in a session of its own, not our child) — then starts a Reconciler on it and looks at
what it does. Engines run without the sandbox here (isolate=False); the chaos and end-to-end tests run the
real `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from poolmgr.devices import Inventory
from poolmgr.engines._process import ProcessLauncher
from poolmgr.inflight import Drain
from poolmgr.lifecycle.effects import DrainRequested
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.lifecycle.runtime import INSTANCE_MARKER, SPAWN_MARKER, EngineRuntime
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState, Trigger
from poolmgr.store import Effect, EventData, PoolView, Registry, StateMachine
from tests.chaos._rig import FAKE_ENGINE, engines, marked_processes, model_file
from tests.pool_steps import seed, step

S, T = PoolState, Trigger
_LISTEN = re.compile(rb"listening on unix://(\S+)")


@dataclass
class Kit:
    """A poolmgr installation: state dir, a fake llama-server, a model, one launcher (reaps our children).
    The state dir is a short one in /tmp: the engines' unix sockets live under it, and a socket path has at
    most 107 bytes (pytest's tmp_path can be longer)."""

    dir: Path
    state_dir: Path
    url: str
    launcher: ProcessLauncher
    pool_ids: list[str]

    @property
    def wrapper(self) -> Path:
        return self.dir / "llama-server"

    def cfg(self, **kw: Any) -> PoolManagerConfig:
        base: dict[str, Any] = {
            "state_dir": self.state_dir, "database_url": self.url, "llama_server": str(self.wrapper),
            "backoff_initial_ms": 100, "backoff_max_ms": 400, "health_check_interval_ms": 100,
            "stop_grace_ms": 1000, "preload_timeout_ms": 15_000,
        }  # fmt: skip
        return PoolManagerConfig(**{**base, **kw})

    def spec(self, name: str = "p") -> PoolSpec:
        pool_id = f"adopt-{uuid.uuid4().hex[:8]}-{name}"
        self.pool_ids.append(pool_id)
        return PoolSpec(id=pool_id, model=str(model_file(self.dir / f"{pool_id}.gguf", "ok")))

    def log_path(self, pool_id: str) -> Path:
        return self.state_dir / "logs" / f"{pool_id}.log"

    def socket_path(self, pool_id: str) -> Path:
        """Where poolmgr runs a pool's engine: its unix socket in the pool's workdir (the address a new poolmgr
        must find an old one's engine at)."""
        return self.state_dir / "work" / pool_id / "engine.sock"

    def endpoint_url(self, pool_id: str) -> str:
        """What poolmgr records as a ready pool's address: the node's data plane, not the engine's socket."""
        return f"{self.cfg().advertised_url}/pools/{pool_id}/engine"

    def detached_engine(self, spec: PoolSpec, *, marked: bool = True) -> tuple[int, int, str]:
        """An engine that outlived the poolmgr that started it: its own session, not our child, serving on the
        pool's socket, output in the pool's log after the launcher's spawn header. (pid, start time, the
        endpoint_url poolmgr recorded for it) once it serves."""
        sock = self.socket_path(spec.id)
        sock.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path(spec.id)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(b"--- poolmgr 2026-01-01T00:00:00.000+00:00: spawn llama-server (an earlier run)\n")
        offset = log.stat().st_size
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if marked:
            env |= {SPAWN_MARKER: spec.id, INSTANCE_MARKER: str(self.state_dir.absolute())}
        argv = [str(self.wrapper), "--model", spec.model, "--host", str(sock), "--alias", spec.served_name]
        with open(log, "ab") as fh:
            subprocess.run(["setsid", "-f", *argv], env=env, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = _leaders_with(spec.model)
            match = _LISTEN.search(log.read_bytes()[offset:])
            if found and match:
                assert match.group(1).decode() == str(sock)
                pid, start = found[0]
                return pid, start, self.endpoint_url(spec.id)
            time.sleep(0.02)
        raise AssertionError(f"the detached engine did not come up:\n{log.read_text()[-2000:]}")


def _leaders_with(model: str) -> list[tuple[int, int]]:
    """Session leaders whose command line names `model` (the detached engines, marked or not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if model.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                raw = (entry / "stat").read_text()
                rest = raw[raw.rfind(")") + 2 :].split()
                if int(rest[3]) == int(entry.name) and rest[0] not in ("Z", "X"):
                    found.append((int(entry.name), int(rest[19])))
    return found


@contextlib.contextmanager
def _kit(tmp_path: Path, url: str) -> Iterator[Kit]:
    (tmp_path / "fake_engine.py").write_bytes(FAKE_ENGINE.read_bytes())
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexport FAKE_ENGINE_LOAD_MS=100\nexec python3 {tmp_path / "fake_engine.py"} "$@"\n')
    wrapper.chmod(0o755)
    state_dir = Path(tempfile.mkdtemp(prefix="adopt.", dir="/tmp"))
    k = Kit(dir=tmp_path, state_dir=state_dir, url=url, launcher=ProcessLauncher(), pool_ids=[])
    try:
        yield k
    finally:
        _kill_all(k)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def kit(tmp_path: Path, sqlite_url: str) -> Iterator[Kit]:
    with _kit(tmp_path, sqlite_url) as k:
        yield k


def _kill_all(k: Kit) -> None:
    for pool_id in k.pool_ids:
        for proc in marked_processes(pool_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for pid, _ in _leaders_with(str(k.dir / f"{pool_id}.gguf")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _seed(registry: Registry, spec: PoolSpec, path: list[Trigger], **updates: Any) -> PoolView:
    """The registry as a previous poolmgr left it: the pool walked along `path`, then `updates` written."""
    registry.register(spec)
    step(registry, spec.id, *path)
    return seed(registry, spec.id, **updates) if updates else registry.get(spec.id)


TO_READY = [T.PLACE, T.START_PRELOAD, T.PRELOAD_OK]
TO_PRELOADING = [T.PLACE, T.START_PRELOAD]


def _run(
    kit: Kit, specs: list[PoolSpec], body: Callable[[Reconciler], Awaitable[None]], *,
    registry_class: type[Registry] = Registry, **cfg: Any,
) -> None:  # fmt: skip
    """Start a reconciler on the kit's database (as `serve` would after a restart), run `body`, shut down
    stopping every engine."""

    async def main() -> None:
        config = kit.cfg(**cfg)
        registry = registry_class(kit.url, node_id=config.node_id)
        runtime = EngineRuntime(config, launcher=kit.launcher, isolate=False)
        rec = Reconciler(config, registry, runtime=runtime, inventory=Inventory)
        await rec.start(specs)
        try:
            await body(rec)
        finally:
            await rec.shutdown(keep_engines=False)
            registry.close()

    asyncio.run(main())


async def _until(rec: Reconciler, pred: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not reached in {timeout} s")


def _spawn_headers(kit: Kit, pool_id: str) -> int:
    return kit.log_path(pool_id).read_bytes().count(b"--- poolmgr ")


# -- ready ------------------------------------------------------------------------------------------------
def test_a_ready_pools_engine_that_outlived_poolmgr_is_adopted_health_checked_and_watched(kit: Kit) -> None:
    spec = kit.spec()
    pid, start, url = kit.detached_engine(spec)
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    seeded = _seed(reg, spec, TO_READY, pid=pid, pid_start_time=start, endpoint_url=url, backoff_step=2)
    before = len(reg.events(pool_id=spec.id))

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: any(e.kind == "adopted" for e in reg.events(pool_id=spec.id)), "adopted")
        beat = reg.get(spec.id).heartbeat_at
        await _until(rec, lambda: reg.get(spec.id).heartbeat_at != beat, "a health check after adoption")
        await asyncio.sleep(0.5)  # several watch loops: still one adoption, no restart
        view = reg.get(spec.id)
        assert (view.state, view.pid, view.pid_start_time, view.backoff_step) == (S.READY, pid, start, 2)
        new = reg.events(pool_id=spec.id)[before:]
        assert [(e.kind, e.detail and e.detail["pid"]) for e in new] == [("adopted", pid)]
        assert _spawn_headers(kit, spec.id) == 1
        # Watched again (a pidfd on a process that is not our child): its death is seen at once.
        os.kill(pid, signal.SIGKILL)
        await _until(rec, lambda: reg.get(spec.id).state is not S.READY, "the crash seen", timeout=3)

    _run(kit, [spec], body)
    crash = next(e for e in reg.events(pool_id=spec.id) if e.trigger == "crash")
    assert (crash.from_state, crash.to_state) == ("ready", "crashed")
    assert seeded.version < reg.get(spec.id).version
    reg.close()


def test_a_ready_pool_whose_engine_died_meanwhile_crashes_and_backs_off_from_its_stored_step(kit: Kit) -> None:
    spec = kit.spec()
    gone = subprocess.Popen(["true"])
    gone.wait()
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_READY, pid=gone.pid, pid_start_time=1, endpoint_url=kit.endpoint_url(spec.id),
          backoff_step=3, restart_count=7)  # fmt: skip

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: reg.get(spec.id).state is S.BACKOFF, "backoff")

    _run(kit, [spec], body, backoff_initial_ms=1000, backoff_max_ms=60_000)
    events = reg.events(pool_id=spec.id)
    crash = next(e for e in events if e.trigger == "crash")
    assert crash.reason == "exit" and crash.exit_code is None and crash.signal is None
    back_off = next(e for e in events if e.trigger == "back_off")
    # Step 3 -> the fourth delay: 1 s * 2**3, +-10 % jitter. Counters continue from the database.
    assert 7200 <= (back_off.backoff_ms or 0) <= 8800
    assert back_off.restart_count == 7
    assert not any(e.kind == "adopted" for e in events)
    reg.close()


def test_the_engine_restarted_after_one_died_meanwhile_binds_over_the_socket_it_left(kit: Kit) -> None:
    spec = kit.spec()
    pid, start, url = kit.detached_engine(spec)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _leaders_with(spec.model) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kit.socket_path(spec.id).is_socket()  # a killed engine does not remove its socket file
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_READY, pid=pid, pid_start_time=start, endpoint_url=url)

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: any(e.trigger == "retry" for e in reg.events(pool_id=spec.id)), "a restart")
        await _until(rec, lambda: reg.get(spec.id).state is S.READY, "ready again")
        view = reg.get(spec.id)
        assert view.pid != pid and view.endpoint_url == url  # a new engine, at the pool's same address

    _run(kit, [spec], body)
    assert not any(e.trigger == "preload_failed" for e in reg.events(pool_id=spec.id))
    reg.close()


# -- preloading -------------------------------------------------------------------------------------------
def test_a_preloading_pool_goes_on_with_its_live_engine_instead_of_a_second_one(kit: Kit) -> None:
    spec = kit.spec()
    pid, start, url = kit.detached_engine(spec)  # it already answers /health 200 on the pool's socket
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_PRELOADING, pid=pid, pid_start_time=start)

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: reg.get(spec.id).state is S.READY, "ready")

    _run(kit, [spec], body)
    events = reg.events(pool_id=spec.id)
    ready = next(e for e in events if e.trigger == "preload_ok")
    assert ready.detail == {"endpoint_url": url}
    adopted = [e for e in events if e.kind == "adopted"]
    assert len(adopted) == 1 and adopted[0].detail and adopted[0].detail["pid"] == pid
    assert adopted[0].id < ready.id
    assert _spawn_headers(kit, spec.id) == 1
    reg.close()


def test_a_pool_caught_between_spawn_and_pid_record_ends_with_exactly_one_engine(kit: Kit) -> None:
    spec = kit.spec()
    stray, _, _ = kit.detached_engine(spec)  # spawned, never recorded: the intent is there, no pid
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_PRELOADING)

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: reg.get(spec.id).state is S.READY, "ready")
        view = reg.get(spec.id)
        assert view.pid != stray
        assert [(p.pid, p.start_time) for p in engines(spec.id)] == [(view.pid, view.pid_start_time)]

    _run(kit, [spec], body)
    assert engines(spec.id) == []
    reg.close()


def test_a_preloading_pool_whose_engine_died_meanwhile_fails_its_preload(kit: Kit) -> None:
    spec = kit.spec()
    pid, start, _ = kit.detached_engine(spec)
    os.kill(pid, signal.SIGKILL)
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_PRELOADING, pid=pid, pid_start_time=start, consecutive_failures=1)

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: any(e.trigger == "preload_failed" for e in reg.events(pool_id=spec.id)), "failed")

    _run(kit, [spec], body, backoff_initial_ms=60_000, backoff_max_ms=60_000)
    failed = next(e for e in reg.events(pool_id=spec.id) if e.trigger == "preload_failed")
    assert failed.detail == {"message": "engine exited while poolmgr was not running"}
    assert reg.get(spec.id).consecutive_failures == 2
    reg.close()


# -- states without an engine, and pids that belong to someone else ------------------------------------------
def test_a_pool_in_backoff_with_a_live_recorded_engine_has_it_stopped_and_waits_its_turn(kit: Kit) -> None:
    spec = kit.spec()
    pid, start, _ = kit.detached_engine(spec)
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    due = reg.clock.now() + timedelta(hours=1)
    _seed(reg, spec, [T.PLACE, T.START_PRELOAD, T.PRELOAD_FAILED, T.BACK_OFF], pid=pid, pid_start_time=start,
          next_restart_at=due)  # fmt: skip

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: reg.get(spec.id).pid is None, "the stale pid cleared")
        await asyncio.sleep(0.3)
        assert reg.get(spec.id).state is S.BACKOFF  # not restarted before its stored time

    _run(kit, [spec], body)
    assert engines(spec.id) == []
    reg.close()


@pytest.mark.parametrize("path", [TO_READY, TO_PRELOADING, [T.PLACE, T.START_PRELOAD, T.PRELOAD_FAILED]],
                         ids=["ready", "preloading", "crashed"])  # fmt: skip
def test_a_recorded_pid_now_owned_by_another_program_is_never_signalled(kit: Kit, path: list[Trigger]) -> None:
    spec = kit.spec()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        reg = Registry(kit.url, node_id=kit.cfg().node_id)
        # The number is the same, the start time is not: another program got the pid.
        _seed(reg, spec, path, pid=other.pid, pid_start_time=1, endpoint_url=kit.endpoint_url(spec.id))

        async def body(rec: Reconciler) -> None:
            await _until(rec, lambda: reg.get(spec.id).pid != other.pid, "the pid let go")

        _run(kit, [spec], body, backoff_initial_ms=60_000, backoff_max_ms=60_000)
        assert other.poll() is None, "the other program was signalled"
        assert not any(e.kind == "adopted" for e in reg.events(pool_id=spec.id))
        reg.close()
    finally:
        other.kill()
        other.wait()


# -- draining ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alive", [True, False], ids=["engine-alive", "engine-gone"])
def test_a_drain_in_progress_finishes_after_a_restart(kit: Kit, alive: bool) -> None:
    spec = kit.spec()
    pid, start, url = kit.detached_engine(spec)
    if not alive:
        os.kill(pid, signal.SIGKILL)
    reg = Registry(kit.url, node_id=kit.cfg().node_id)
    _seed(reg, spec, TO_READY, pid=pid, pid_start_time=start, endpoint_url=url)
    fire(reg, spec.id, DrainRequested(Drain(reg.clock.now(), 60000, "drain-1")))

    async def body(rec: Reconciler) -> None:
        await _until(rec, lambda: reg.get(spec.id).state is S.STOPPED, "drained")

    _run(kit, [spec], body)
    events = reg.events(pool_id=spec.id)
    assert [e.trigger for e in events if e.trigger][-1] == "drain_done"
    assert not any(e.trigger == "crash" for e in events)
    assert [e.kind for e in events if e.kind == "adopted"] == (["adopted"] if alive else [])
    assert engines(spec.id) == []
    reg.close()


# -- a COMMIT whose answer is lost --------------------------------------------------------------------------
class LossyRegistry(Registry):
    """Every write commits, but the first answer of each distinct write is lost: the connection drops right
    after COMMIT, as when PostgreSQL restarts at that moment. The caller sees an OperationalError and retries."""

    lost: list[str] = []

    def _lose_once(self, key: str) -> None:
        if key not in self.lost:
            self.lost.append(key)
            raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))

    def note_all(self, notes: Sequence[tuple[str, EventData]]) -> None:
        super().note_all(notes)
        self._lose_once(f"notes {notes!r}")  # the adoptions at start: one transaction, its answer lost once

    def apply(
        self, pool_id: str, effect: Effect, *, machine: StateMachine | None = None,
        expect: Collection[PoolState] | None = None, then: Callable[[PoolView], Effect | None] | None = None,
    ) -> PoolView:  # fmt: skip
        view = super().apply(pool_id, effect, machine=machine, expect=expect, then=then)
        if effect.trigger is not None:  # a transition happens once per version
            self._lose_once(f"{pool_id} transition {view.version}")
        else:  # a fact (pid recorded, heartbeat, an audit note) may be written again: its first answer is lost
            self._lose_once(f"{pool_id} fact {effect!r}")
        return view


def test_writes_whose_commit_answer_was_lost_are_retried_and_never_doubled(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _kit(tmp_path, db_url) as k:
        fresh, running = k.spec("fresh"), k.spec("running")
        pid, start, url = k.detached_engine(running)
        reg = Registry(k.url, node_id=k.cfg().node_id)
        _seed(reg, running, TO_READY, pid=pid, pid_start_time=start, endpoint_url=url)
        LossyRegistry.lost = []

        async def body(rec: Reconciler) -> None:
            await _until(rec, lambda: reg.get(fresh.id).state is S.READY, "the fresh pool ready")
            await _until(rec, lambda: any(e.kind == "adopted" for e in reg.events(pool_id=running.id)), "adopted")
            await asyncio.sleep(0.3)

        _run(k, [fresh, running], body, registry_class=LossyRegistry)
        assert sum(" transition " in key for key in LossyRegistry.lost) >= 3
        assert re.search(r"waiting for the database to answer \w*Registry.apply", caplog.text)
        fresh_edges = [(e.from_state, e.to_state) for e in reg.events(pool_id=fresh.id) if e.trigger]
        assert fresh_edges[:3] == [("discovered", "placed"), ("placed", "preloading"), ("preloading", "ready")]
        assert len(fresh_edges) == len(set(fresh_edges))  # shutdown adds ready -> stopped, once
        assert [e.kind for e in reg.events(pool_id=running.id)].count("adopted") == 1
        reg.close()

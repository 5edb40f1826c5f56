"""The compiled spawner: its plan encoding against its own C parser, its build cache, and every layer really in
force in the engine it execs (as root), the same as under the Python trampoline."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolmgr.errors import ConfigError
from poolmgr.isolation import EXIT_ISOLATION_FAILED, PreparedIsolation, choose_spawner, spawner_state, wrap_command
from poolmgr.isolation import _spawner as sp
from poolmgr.isolation._seccomp import seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi
from poolmgr.settings import PoolManagerConfig

from .conftest import Sandbox

HERE = Path(__file__).parent
CC = shutil.which(os.environ.get("CC", "cc").split()[0] if os.environ.get("CC") else "cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this host")
# Runs as the engine: what /proc says about itself, and a write outside its workdir (only Landlock refuses it:
# /tmp is world-writable).
ENGINE_PROBE = """
import errno, json, os, sys
def attempt(path):
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "pid": os.getpid(),
    "status": {k: v.strip() for k, v in status.items()},
    "cgroup": open("/proc/self/cgroup").read(),
    "limits": open("/proc/self/limits").read(),
    "cwd": os.getcwd(),
    "write_outside": attempt(sys.argv[1]),
    "write_workdir": attempt("probe-file"),
}))
"""
SAME_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


# ---- the plan's encoding, read back by the helper's own parser -------------------------------------------


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """_spawner.c's parser, built to print the plan it read as JSON (tests/isolation/spawner_dump.c)."""
    if CC is None:
        pytest.skip("no C compiler on this host")
    out = tmp_path_factory.mktemp("dump") / "spawner-dump"
    cmd = [CC, *sp.CFLAGS, "-Werror", "-I", str(sp.SOURCE.parent), "-o", str(out), str(HERE / "spawner_dump.c")]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def _parsed(dump: Path, plan: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([str(dump), *sp.plan_argv(plan), "--", "x"], capture_output=True, text=True, check=True)
    parsed: dict[str, Any] = json.loads(out.stdout)
    return parsed


def _normal(plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` as the helper holds it: every key present, a layer not asked for empty / false / null."""
    landlock = plan.get("landlock")
    return {
        "cgroups": list(plan.get("cgroups") or []),
        "rlimits": [list(r) for r in plan.get("rlimits") or []],
        "bounding": bool(plan.get("bounding")),
        "caps": bool(plan.get("caps")),
        "nnp": bool(plan.get("nnp")),
        "uid": plan.get("uid"),
        "gid": plan.get("gid") if plan.get("uid") is not None else None,
        "workdir": plan.get("workdir") or None,
        "landlock": {k: landlock[k] for k in ("abi", "fs", "net", "scoped", "paths")} if landlock else None,
        "seccomp": plan.get("seccomp") or None,
    }


PLAN: dict[str, Any] = {
    "v": 1,
    "pool": "p",
    "uid": 999,
    "gid": 998,
    "workdir": "/srv/a,b=c d/é",
    "cgroups": ["/sys/fs/cgroup/pids/poolmgr/x,y=z/cgroup.procs", "/sys/fs/cgroup/memory/p q/cgroup.procs"],
    "rlimits": [[4, 0, 0], [7, 1024, -1], [1, -1, -1], [6, 2**62, 2**63]],
    "bounding": True,
    "caps": True,
    "nnp": True,
    "landlock": {"abi": 7, "fs": 32767, "net": 3, "scoped": 3, "paths": [["/srv/a,b=c d", 32767], ["/dev", 49154]]},
    "seccomp": "200000000400000015000100",
}


@needs_cc
def test_the_helper_compiles_cleanly_with_warnings_as_errors(tmp_path: Path) -> None:
    cmd = [str(CC), *sp.CFLAGS, "-Werror", "-o", str(tmp_path / "spawn"), str(sp.SOURCE)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (0, "")


def test_every_layer_of_a_plan_reaches_the_helper_as_written(dump: Path) -> None:
    assert _parsed(dump, PLAN) == _normal(PLAN)


def test_a_plan_that_asks_for_nothing_gives_no_token(dump: Path) -> None:
    empty = {"uid": None, "gid": None, "workdir": "", "cgroups": [], "rlimits": [], "bounding": False,
             "caps": False, "nnp": False, "landlock": None, "seccomp": None}  # fmt: skip
    assert sp.plan_argv(empty) == []
    assert _parsed(dump, empty) == _normal(empty)


PATHS = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(workdir=PATHS, rule=PATHS, cgroup=PATHS)
def test_any_path_survives_the_encoding(dump: Path, workdir: str, rule: str, cgroup: str) -> None:
    plan = {"workdir": workdir, "cgroups": [cgroup], "landlock": {**PLAN["landlock"], "paths": [[rule, 1]]}}
    assert _parsed(dump, plan) == _normal(plan)


def test_a_real_prepared_plan_reaches_the_helper_as_written(sandbox: Sandbox, dump: Path) -> None:
    prepared = sandbox.prepare(sandbox.spec({"pids_max": 32}))
    assert _parsed(dump, json.loads(prepared.plan_json)) == _normal(dict(prepared.plan))


BAD_TOKENS = [
    (["bogus"], "plan: bogus: want KEY=VALUE"),
    (["=1"], "plan: =1: want KEY=VALUE"),
    (["colour=blue"], "plan: colour=blue: unknown key"),
    (["rlimit=4,0"], "plan: rlimit=4,0: want RES,SOFT,HARD"),
    (["rlimit=4,0,x"], "plan: rlimit=4,0,x: want RES,SOFT,HARD"),
    (["rlimit=4,-2,0"], "plan: rlimit=4,-2,0: want RES,SOFT,HARD"),
    (["uid=5"], "plan: uid and gid go together"),
    (["uid=4294967295", "gid=1"], "plan: uid=4294967295: want a decimal id"),
    (["uid=1", "uid=2", "gid=1"], "plan: uid=2: given twice"),
    (["nnp=yes"], "plan: nnp=yes: want 1 or 0"),
    (["workdir="], "plan: workdir=: empty value"),
    (["cgroup="], "plan: cgroup=: empty value"),
    (["llpath=1,/tmp"], "plan: llpath without landlock"),
    (["landlock=7,1,0,0", "llpath=1"], "plan: llpath=1: want ALLOWED,PATH"),
    (["landlock=0,1,0,0"], "plan: landlock=0,1,0,0: want ABI,FS,NET,SCOPED"),
    (["seccomp=abc"], "plan: seccomp=abc: want the BPF program as an even number of hex digits"),
    (["seccomp=zz"], "plan: seccomp=zz: want the BPF program"),
]


@needs_cc
@pytest.mark.parametrize(("tokens", "message"), BAD_TOKENS, ids=[" ".join(t) for t, _ in BAD_TOKENS])
def test_a_plan_the_helper_cannot_read_exits_126_and_runs_nothing(tokens: list[str], message: str) -> None:
    helper = choose_spawner().path
    assert helper is not None
    out = subprocess.run([str(helper), *tokens, "--", "echo", "engine ran"], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (EXIT_ISOLATION_FAILED, "")
    assert out.stderr.startswith(f"poolmgr-isolation: {message}")
    assert out.stderr.count("\n") == 1


@needs_cc
def test_a_bpf_program_of_the_wrong_size_is_refused_by_the_seccomp_layer() -> None:
    helper = choose_spawner().path
    assert helper is not None
    out = subprocess.run([str(helper), "nnp=1", "seccomp=0011", "--", "true"], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (EXIT_ISOLATION_FAILED, "poolmgr-isolation: seccomp: bad BPF program "
                                                                   "of 2 bytes\n")  # fmt: skip


# ---- every layer in force in the exec'd engine (root) -----------------------------------------------------


def _probe(box: Sandbox, prepared: PreparedIsolation, python: str) -> dict[str, Any]:
    outside = f"/tmp/poolmgr-spawner-{uuid.uuid4().hex[:8]}"
    proc = box.spawn(prepared, [python, "-c", ENGINE_PROBE, outside])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert not os.path.exists(outside)
    result: dict[str, Any] = json.loads(out)
    result["spawned_pid"] = proc.pid
    return result


@pytest.fixture
def full(sandbox: Sandbox) -> PreparedIsolation:
    prepared = sandbox.prepare(sandbox.spec({"pids_max": 32, "memory_max": "512M"}))
    if prepared.spawner is None:
        pytest.skip("no compiled spawner on this host (no C compiler?)")
    return prepared


def test_prepare_says_the_compiled_helper_applies_the_layers(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="poolmgr.isolation._prepare"):
        prepared = sandbox.prepare(sandbox.spec())
    if prepared.spawner is None:
        pytest.skip("no compiled spawner on this host (no C compiler?)")
    assert prepared.summary().endswith(" | spawner=c")
    assert any("spawner=c" in r.getMessage() and "in force:" in r.getMessage() for r in caplog.records)
    argv, _env = wrap_command(prepared, ["true"], {})
    assert argv[: 1 + len(sp.plan_argv(prepared.plan))] == [str(prepared.spawner), *sp.plan_argv(prepared.plan)]


def test_every_layer_is_in_force_in_the_engine_the_helper_execs(
    sandbox: Sandbox, full: PreparedIsolation, probe_python: str, engine_ids: tuple[int, int]
) -> None:
    seen = _probe(sandbox, full, probe_python)
    status = seen["status"]
    assert seen["pid"] == seen["spawned_pid"]  # exec'd in place: the engine's pid is the one poolmgr spawned
    assert status["Uid"].split() == [str(engine_ids[0])] * 4 and status["Gid"].split() == [str(engine_ids[1])] * 4
    assert status["Groups"] == ""
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, f"{field} = {status[field]}"
    assert status["NoNewPrivs"] == "1"
    if not seccomp_unavailable_reason():
        assert status["Seccomp"] == "2"
    assert seen["cwd"] == str(full.spec.workdir.absolute())
    core = next(line for line in seen["limits"].splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    if full.cgroup is not None:
        assert any(line.endswith(f"/poolmgr/{sandbox.pool_id}") for line in seen["cgroup"].splitlines())
    if landlock_abi() >= 1:
        assert seen["write_outside"] == "EACCES"
    assert seen["write_workdir"] == "ok"


def test_the_helper_leaves_the_engine_exactly_as_the_python_trampoline_does(
    sandbox: Sandbox, full: PreparedIsolation, probe_python: str
) -> None:
    compiled = _probe(sandbox, full, probe_python)
    python = _probe(sandbox, replace(full, spawner=None), probe_python)
    assert {f: compiled["status"][f] for f in SAME_FIELDS} == {f: python["status"][f] for f in SAME_FIELDS}
    for key in ("cgroup", "limits", "cwd", "write_outside", "write_workdir"):
        assert compiled[key] == python[key], key


# ---- the build cache --------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    if CC is None:
        pytest.skip("no C compiler on this host")
    return tmp_path / "cache" / "poolmgr" / "spawner"


@pytest.fixture
def fresh_choice(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """choose_spawner() answering afresh, with its cache in `cache`; the process's own answer comes back after."""
    monkeypatch.setattr(sp, "cache_root", lambda: cache)
    choose_spawner.cache_clear()
    yield
    choose_spawner.cache_clear()


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_the_helper_is_built_once_then_reused(cache: Path) -> None:
    binary = sp.build_spawner(cache, cc=[str(CC)])
    key = sp.build_key(sp.SOURCE.read_bytes())
    assert binary == cache / key / sp.BINARY
    inode = binary.stat().st_ino
    again = sp.build_spawner(cache, cc=["/nonexistent/cc"])  # no compiler needed: the cached one is used
    assert again == binary and again.stat().st_ino == inode
    assert _listing(cache / key) == [sp.BINARY]
    for directory in (cache, cache / key):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755


def test_the_build_goes_to_a_temporary_file_renamed_into_place(cache: Path, tmp_path: Path) -> None:
    record = tmp_path / "outputs"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\nfor a; do [ "$prev" = -o ] && echo "$a" >> {record}; prev=$a; done\nexec {CC} "$@"\n'
    )
    wrapper.chmod(0o755)
    binary = sp.build_spawner(cache, cc=[str(wrapper)])
    (written,) = record.read_text().split()
    assert Path(written).parent == binary.parent and Path(written).name.startswith(f".{sp.BINARY}.")
    assert not Path(written).exists()


def test_concurrent_builds_all_get_a_working_helper(cache: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: sp.build_spawner(cache, cc=[str(CC)]), range(4)))
    assert len(set(built)) == 1
    assert _listing(built[0].parent) == [sp.BINARY]
    out = subprocess.run([str(built[0]), "--", "echo", "ok"], capture_output=True, text=True)
    assert out.stdout == "ok\n"


def test_a_group_writable_helper_is_refused_and_rebuilt(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    binary = sp.build_spawner(cache, cc=[str(CC)])
    binary.write_bytes(b"#!/bin/sh\necho swapped\n")
    binary.chmod(0o775)
    assert "group or other" in spawner_problem(binary)
    with caplog.at_level(logging.WARNING):
        rebuilt = sp.build_spawner(cache, cc=[str(CC)])
    assert stat.S_IMODE(rebuilt.stat().st_mode) == 0o755
    assert b"swapped" not in rebuilt.read_bytes()
    assert any("refusing" in r.getMessage() for r in caplog.records)


def spawner_problem(binary: Path) -> str:
    problem = sp._binary_problem(binary)
    assert problem is not None
    return problem


def test_a_helper_or_directory_owned_by_someone_else_is_rebuilt(cache: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    binary = sp.build_spawner(cache, cc=[str(CC)])
    os.chown(binary, 65534, 65534)
    assert sp.build_spawner(cache, cc=[str(CC)]).stat().st_uid == 0
    os.chown(binary.parent, 65534, 65534)
    rebuilt = sp.build_spawner(cache, cc=[str(CC)])
    assert rebuilt.parent.stat().st_uid == 0 and rebuilt.stat().st_uid == 0


def test_a_group_writable_cache_directory_is_made_again(cache: Path) -> None:
    binary = sp.build_spawner(cache, cc=[str(CC)])
    binary.parent.chmod(0o777)
    rebuilt = sp.build_spawner(cache, cc=[str(CC)])
    assert stat.S_IMODE(rebuilt.parent.stat().st_mode) == 0o755


def test_a_cache_under_a_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    if CC is None:
        pytest.skip("no C compiler on this host")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(sp.SpawnerUnavailable, match="writable by group or other"):
        sp.build_spawner(shared / "poolmgr" / "spawner", cc=[str(CC)])


@pytest.mark.usefixtures("fresh_choice")
def test_without_a_compiler_engines_start_through_the_python_trampoline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sandbox: Sandbox
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO):
        prepared = sandbox.prepare(sandbox.spec())
    assert prepared.spawner is None
    assert prepared.summary().endswith(" | spawner=python")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/nonexistent/cc" in warnings[0] and "Python trampoline" in warnings[0]
    argv, _env = wrap_command(prepared, ["echo", "ran"], {})
    assert argv[:3] == [sys.executable, "-I", "-S"]
    assert sandbox.run(prepared, ["echo", "ran"])[:2] == (0, "ran\n")
    assert choose_spawner().detail.startswith("Python trampoline: C compiler /nonexistent/cc")


@pytest.mark.usefixtures("fresh_choice")
def test_the_operator_can_force_the_python_trampoline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sp.CHOICE_VAR, "python")
    assert choose_spawner().path is None
    assert "POOL_MANAGERD_SPAWNER=python" in choose_spawner().detail
    assert spawner_state().detail == choose_spawner().detail
    assert PoolManagerConfig.from_env({sp.CHOICE_VAR: "python"}).spawner == "python"
    with pytest.raises(ConfigError, match="POOL_MANAGERD_SPAWNER=fast: allowed values are auto, python"):
        PoolManagerConfig.from_env({sp.CHOICE_VAR: "fast"})


@pytest.mark.usefixtures("fresh_choice")
def test_doctor_state_says_not_built_yet_then_names_the_helper(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    before = spawner_state()
    assert (before.usable, before.path) == (True, None) and before.detail.startswith("not built yet")
    assert not cache.exists()  # asking built nothing
    built = choose_spawner()
    assert built.path is not None and spawner_state() == built
    monkeypatch.setenv("CC", "/nonexistent/cc")
    built.path.unlink()
    assert spawner_state().detail.startswith("Python trampoline: no C compiler")


@pytest.mark.usefixtures("fresh_choice")
def test_a_helper_removed_under_a_running_poolmgr_is_built_again() -> None:
    built = sp.ensure_spawner()
    assert built is not None
    shutil.rmtree(built.parent)
    assert sp.ensure_spawner() == built and built.is_file()


def test_a_compiler_that_fails_leaves_nothing_behind(cache: Path) -> None:
    with pytest.raises(sp.SpawnerUnavailable, match=r"false failed \(exit 1\)"):
        sp.build_spawner(cache, cc=["false"])
    (key,) = cache.iterdir()
    assert _listing(key) == []

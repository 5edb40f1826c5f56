"""The spawner on its own, both of them (the Python trampoline and the compiled helper): plan parsing, PATH
lookup, and refusing to exec on a bad plan. test_spawner.py has the compiled helper's own tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from poolmgr.isolation import EXIT_EXEC_FAILED, EXIT_ISOLATION_FAILED
from poolmgr.isolation._prepare import TRAMPOLINE
from poolmgr.isolation._spawner import ensure_spawner, plan_argv
from poolmgr.isolation._trampoline import _parse_plan, find_executable

Head = Callable[[dict[str, Any]], list[str]]  # a plan -> the spawner's argv before `--`
# What each spawner is given as an unreadable plan, and the start of its one line on stderr.
BAD_PLANS = {
    "python": ("{not json", "poolmgr-isolation: plan: not valid JSON"),
    "c": ("not-a-token", "poolmgr-isolation: plan: not-a-token: want KEY=VALUE"),
}


def _run(argv: list[str], path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={"PATH": path})


def _trampoline(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-I", "-S", str(TRAMPOLINE), *args])


@pytest.fixture(params=["python", "c"])
def head(request: pytest.FixtureRequest) -> Head:
    """Each spawner: the Python trampoline reads the plan as JSON, the compiled helper as KEY=VALUE tokens."""
    if request.param == "python":
        return lambda plan: [sys.executable, "-I", "-S", str(TRAMPOLINE), json.dumps(plan)]
    helper = ensure_spawner()
    if helper is None:
        pytest.skip("no compiled spawner on this host (no C compiler?)")
    return lambda plan: [str(helper), *plan_argv(plan)]


def test_plan_parser_reads_what_prepare_writes() -> None:
    plan: dict[str, object] = {
        "uid": 999,
        "gid": None,
        "nnp": True,
        "caps": False,
        "workdir": "/w/é",
        "rlimits": [[4, 0, 0]],
    }
    plan["landlock"] = {"abi": 7, "fs": 1 << 9, "net": 3, "paths": [["/w", 1 << 15]], "scoped": 3}
    assert _parse_plan(json.dumps(plan, separators=(",", ":"))) == plan


def test_plan_parser_refuses_a_non_object() -> None:
    with pytest.raises(ValueError):
        _parse_plan("[1, 2]")


def test_find_executable_searches_path_as_the_current_user(tmp_path: Path) -> None:
    tool = tmp_path / "engine"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (tmp_path / "not-exec").write_text("")
    assert find_executable("engine", f"/nonexistent:{tmp_path}") == str(tool)
    assert find_executable("/abs/path", "") == "/abs/path"
    with pytest.raises(FileNotFoundError):
        find_executable("not-exec", str(tmp_path))


def test_an_empty_plan_just_execs_the_engine(head: Head) -> None:
    out = _run([*head({}), "--", "echo", "engine ran"])
    assert (out.returncode, out.stdout, out.stderr) == (0, "engine ran\n", "")


@pytest.mark.parametrize("kind", ["python", "c"])
def test_a_bad_plan_exits_126_without_running_the_engine(kind: str) -> None:
    bad, message = BAD_PLANS[kind]
    if kind == "python":
        argv = [sys.executable, "-I", "-S", str(TRAMPOLINE), bad]
    elif (helper := ensure_spawner()) is not None:
        argv = [str(helper), bad]
    else:
        pytest.skip("no compiled spawner on this host (no C compiler?)")
    out = _run([*argv, "--", "echo", "engine ran"])
    assert out.returncode == EXIT_ISOLATION_FAILED
    assert out.stdout == ""
    assert out.stderr.startswith(message)
    assert out.stderr.count("\n") == 1


def test_a_missing_separator_exits_126(head: Head) -> None:
    out = _run([*head({}), "echo", "x"])
    assert out.returncode == EXIT_ISOLATION_FAILED
    assert out.stderr.startswith("poolmgr-isolation: usage:")


def test_an_unknown_engine_exits_127(head: Head) -> None:
    out = _run([*head({}), "--", "no-such-engine-xyz"])
    assert out.returncode == EXIT_EXEC_FAILED
    assert out.stderr == "poolmgr-isolation: exec: no-such-engine-xyz: No such file or directory\n"


def test_the_engine_is_found_on_path_as_the_engine_user_would(head: Head, tmp_path: Path) -> None:
    (tmp_path / "not-exec").write_text("#!/bin/sh\necho wrong\n")
    tool = tmp_path / "engine"
    tool.write_text('#!/bin/sh\necho "engine $1"\n')
    tool.chmod(0o755)
    out = _run([*head({}), "--", "engine", "ran"], path=f"/nonexistent:{tmp_path}:/usr/bin:/bin")
    assert (out.returncode, out.stdout) == (0, "engine ran\n")
    out = _run([*head({"workdir": str(tmp_path)}), "--", "engine", "ran"], path="/nonexistent::/bin")
    assert (out.returncode, out.stdout) == (0, "engine ran\n")  # an empty entry is the current directory
    out = _run([*head({}), "--", "not-exec"], path=str(tmp_path))
    assert out.returncode == EXIT_EXEC_FAILED


def test_a_failing_layer_names_itself_and_exits_126(head: Head, tmp_path: Path) -> None:
    out = _run([*head({"workdir": str(tmp_path / "gone")}), "--", "echo", "engine ran"])
    assert (out.returncode, out.stdout) == (EXIT_ISOLATION_FAILED, "")
    assert out.stderr == "poolmgr-isolation: workdir: No such file or directory\n"

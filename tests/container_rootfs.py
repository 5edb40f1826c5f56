"""A minimal container root filesystem for tests, without a registry: the shared libraries a binary links
(as `ldd` lists them), the dynamic loader, a two-line /etc/passwd and /etc/group, and empty mount points.

The binary itself and the model are mounted read-only by poolmgr at their host paths. The tree is cached under
`ROOTFS_CACHE` by a key of the libraries' paths, sizes and times, so a second run builds nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOTFS_CACHE = Path(os.environ.get("POOLMGR_TEST_ROOTFS_CACHE", "/var/cache/poolmgr/rootfs"))
_LDD_PATH = re.compile(r"(/\S+)")


def linked_libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return sorted({Path(m.group(1)) for line in out.splitlines() if (m := _LDD_PATH.search(line.split("=>")[-1]))})


def _key(libs: list[Path]) -> str:
    h = hashlib.sha256()
    for lib in libs:
        st = lib.stat()
        h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _build(dest: Path, libs: list[Path]) -> None:
    for name in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "proc", "dev", "sys", "etc", "tmp", "run"):
        (dest / name).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        (dest / name).symlink_to(f"usr/{name}")
    for lib in libs:
        # Debian is usr-merged: /lib/x86_64-linux-gnu/libc.so.6 lands in usr/lib/…, reached again via lib -> usr/lib
        rel = Path(*lib.resolve(strict=False).parts[1:]) if lib.parts[1] == "usr" else Path("usr", *lib.parts[1:])
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest / rel)  # follows the symlink: the file under its linked name
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/:/sbin/nologin\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def minimal_rootfs(binary: Path, uid: int, gid: int) -> Path:
    """The cached tree for `binary`, owned by the engine user (rootless podman creates mount points in it)."""
    libs = linked_libraries(binary)
    dest = ROOTFS_CACHE / _key(libs)
    if not dest.is_dir():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _build(tmp, libs)
        os.chmod(tmp, 0o755)
        tmp.parent.chmod(0o755)
        os.replace(tmp, dest)
    for dirpath, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(dest, uid, gid)
    return dest

"""Runs INSIDE the sandbox (as `python3 -c`): tries what an engine must not do, prints one JSON line.

argv: [tcp port of a listener to connect to, port the sandbox allows binding (or 0), another port]
Each entry is "ok" or the errno name the attempt failed with.
"""

import ctypes
import errno
import json
import os
import socket
import sys
import threading
from collections.abc import Callable


def attempt(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def bind(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def open_socket(family: int, kind: int) -> None:
    socket.socket(family, kind).close()


def write(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")
    os.unlink(path)


def write_existing(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


def thread() -> None:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


target, allowed, other = (int(a) for a in sys.argv[1:4])
results = {
    "tcp_connect": attempt(lambda: connect(target)),
    "udp_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_DGRAM)),
    "udp6_socket": attempt(lambda: open_socket(socket.AF_INET6, socket.SOCK_DGRAM)),
    "raw_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_RAW)),
    "packet_socket": attempt(lambda: open_socket(17, socket.SOCK_RAW)),
    "tcp_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_STREAM)),
    "ptrace": attempt(lambda: libc_call("ptrace", 0, 0, 0, 0)),
    "unshare_user": attempt(lambda: libc_call("unshare", 0x10000000)),
    "write_outside": attempt(lambda: write(f"/tmp/poolmgr-probe-{os.getpid()}")),
    "write_workdir": attempt(lambda: write(f"probe-{os.getpid()}")),
    "write_shm": attempt(lambda: write(f"/dev/shm/poolmgr-probe-{os.getpid()}")),
    "write_dev_null": attempt(lambda: write_existing("/dev/null")),
    "bind_allowed": attempt(lambda: bind(allowed)),
    "bind_other": attempt(lambda: bind(other)),
    "thread": attempt(thread),
    "setuid_root": attempt(lambda: os.setuid(0)),
}
print(json.dumps(results))

"""Runs INSIDE the sandbox (as `python3 -c`, cwd = the workdir): tries what an engine may and may not do.

argv: [tcp port of a listener on 127.0.0.1 to connect to]
Prints one JSON line; each entry is "ok" or the errno name the attempt failed with.
"""

import ctypes
import errno
import json
import os
import socket
import sys
import threading
from collections.abc import Callable

SYS_SOCKET = {"x86_64": 41, "aarch64": 198}


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


def raw_socket_syscall(family: int, kind: int) -> None:
    """socket(2) with the family's high 32 bits set: the kernel reads an int, a 64-bit filter compare would not."""
    nr = SYS_SOCKET.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "unknown machine")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(family), ctypes.c_long(kind), ctypes.c_long(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(fd)


def open_socket(family: int, kind: int, proto: int = 0) -> None:
    socket.socket(family, kind, proto).close()


def tcp_connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def tcp_bind(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        s.listen()


def unix_serve(path: str) -> None:
    """What the engine does on its data plane: bind + listen on a pathname socket, then answer a connection."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(path)
            server.listen()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"pong")
                    if client.recv(4) != b"pong":
                        raise OSError(errno.EIO, "no reply over the unix socket")
    finally:
        if os.path.exists(path):
            os.unlink(path)


def unix_socketpair() -> None:
    for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM):
        s.close()


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


target = int(sys.argv[1])
pid = os.getpid()
results = {
    "tcp_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_STREAM)),
    "udp_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_DGRAM)),
    "tcp6_socket": attempt(lambda: open_socket(socket.AF_INET6, socket.SOCK_STREAM)),
    "udp6_socket": attempt(lambda: open_socket(socket.AF_INET6, socket.SOCK_DGRAM)),
    "sctp_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_STREAM, 132)),
    "raw_socket": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_RAW)),
    "packet_socket": attempt(lambda: open_socket(17, socket.SOCK_RAW)),
    "tcp_socket_high_bits": attempt(lambda: raw_socket_syscall((1 << 32) | socket.AF_INET, socket.SOCK_STREAM)),
    "inet_socketpair": attempt(lambda: socket.socketpair(socket.AF_INET, socket.SOCK_STREAM)),
    "tcp_connect": attempt(lambda: tcp_connect(target)),
    "tcp_bind": attempt(lambda: tcp_bind(socket.AF_INET, "127.0.0.1")),
    "tcp6_bind": attempt(lambda: tcp_bind(socket.AF_INET6, "::1")),
    "netlink_socket": attempt(lambda: open_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
    "unix_socketpair": attempt(unix_socketpair),
    "unix_serve_workdir": attempt(lambda: unix_serve(os.path.join(os.getcwd(), f"probe-{pid}.sock"))),
    "unix_bind_outside": attempt(lambda: unix_serve(f"/tmp/poolmgr-probe-{pid}.sock")),
    "ptrace": attempt(lambda: libc_call("ptrace", 0, 0, 0, 0)),
    "unshare_user": attempt(lambda: libc_call("unshare", 0x10000000)),
    "write_outside": attempt(lambda: write(f"/tmp/poolmgr-probe-{pid}")),
    "write_workdir": attempt(lambda: write(f"probe-{pid}")),
    "write_shm": attempt(lambda: write(f"/dev/shm/poolmgr-probe-{pid}")),
    "write_dev_null": attempt(lambda: write_existing("/dev/null")),
    "thread": attempt(thread),
    "setuid_root": attempt(lambda: os.setuid(0)),
}
print(json.dumps(results))

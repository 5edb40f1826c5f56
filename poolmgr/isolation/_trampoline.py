"""The trampoline: applies a prepared isolation plan to itself, then execs the engine.

    python -I -S .../_trampoline.py '<plan json>' -- engine argv...

It runs between fork and the engine's exec, single-threaded, on the restart path, so it imports only what
it must (no `json`: it pulls in `re`; the C scanner `_json` is enough) and nothing from poolmgr. Order:
cgroup, rlimits, bounding set, ambient set, groups/gid/uid, chdir, capset, no_new_privs, Landlock, seccomp,
exec. A step the plan asks for that fails writes one line `poolmgr-isolation: <layer>: <reason>` to stderr
and exits 126: the engine is never exec'd half-protected. The parent (`prepare`) decides which layers the
host supports; this module only applies what the plan says. Its ctypes helpers are also used by `doctor`.

Engines start through its compiled twin, `_spawner.c` (the same steps, order and error lines, without an
interpreter), where a C compiler works; this module is the fallback (and POOL_MANAGERD_SPAWNER=python). A change
to one is a change to both: tests/isolation/test_trampoline.py runs its cases against each.
"""

from __future__ import annotations

import ctypes
import os
import sys

TYPE_CHECKING = False  # `typing` costs ~20 ms at import (it pulls in re): only type checkers read these
if TYPE_CHECKING:
    from typing import Any, NoReturn

EXIT_ISOLATION_FAILED = 126
EXIT_EXEC_FAILED = 127

# prctl options (linux/prctl.h)
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
CAP_SETPCAP = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Syscall numbers: Landlock's are the same on every architecture (new-style numbering); capset is not.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_CAPGET = {"x86_64": 125, "aarch64": 90}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

# Landlock filesystem rights (linux/landlock.h) and the ABI that introduced each.
LL_FS_WRITE_FILE = 1 << 1
LL_FS_REMOVE_DIR = 1 << 4
LL_FS_REMOVE_FILE = 1 << 5
LL_FS_MAKE_CHAR = 1 << 6
LL_FS_MAKE_DIR = 1 << 7
LL_FS_MAKE_REG = 1 << 8
LL_FS_MAKE_SOCK = 1 << 9
LL_FS_MAKE_FIFO = 1 << 10
LL_FS_MAKE_BLOCK = 1 << 11
LL_FS_MAKE_SYM = 1 << 12
LL_FS_REFER = 1 << 13  # ABI 2
LL_FS_TRUNCATE = 1 << 14  # ABI 3
LL_FS_IOCTL_DEV = 1 << 15  # ABI 5
LL_NET_BIND_TCP = 1 << 0  # ABI 4
LL_NET_CONNECT_TCP = 1 << 1  # ABI 4
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LL_SCOPE_SIGNAL = 1 << 1  # ABI 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class IsolationStepError(Exception):
    """A layer could not be applied; str() is the reason."""


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int32)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _oserror(what: str) -> IsolationStepError:
    err = ctypes.get_errno()
    return IsolationStepError(f"{what}: {os.strerror(err)} (errno {err})")


def _prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    res: int = _libc.prctl(option, arg2, arg3, 0, 0)
    if res < 0:
        raise _oserror(what)
    return res


def _syscall(nr: int, *args: Any) -> int:
    res: int = _libc.syscall(ctypes.c_long(nr), *args)
    return res


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is missing or disabled."""
    res = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(res, 0)


def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except OSError:
        return 40


def has_effective_cap(cap: int) -> bool:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    nr = _SYS_CAPGET.get(os.uname().machine)
    if nr is None:
        return os.geteuid() == 0
    if _syscall(nr, ctypes.byref(hdr), ctypes.byref(data)) < 0:
        return False
    return bool(data[cap // 32].effective & (1 << (cap % 32)))


def join_cgroups(join_files: list[str]) -> None:
    """Write "0" (this process, single-threaded here) to each file: v1 `tasks` skips the kernel's global
    threadgroup lock (see poolmgr/isolation/_cgroup.py)."""
    for path in join_files:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as exc:
            raise IsolationStepError(f"{path}: {exc.strerror}") from None


def set_rlimits(limits: list[list[int]]) -> None:
    import resource

    for res, soft, hard in limits:
        try:
            resource.setrlimit(res, (soft, hard))
        except (OSError, ValueError) as exc:
            raise IsolationStepError(f"resource {res} to ({soft}, {hard}): {exc}") from None


def drop_bounding_set() -> None:
    for cap in range(cap_last_cap() + 1):
        if _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
            _prctl(PR_CAPBSET_DROP, cap, what=f"PR_CAPBSET_DROP cap {cap}")


def clear_ambient() -> None:
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 and ctypes.get_errno() != 22:
        raise _oserror("PR_CAP_AMBIENT_CLEAR_ALL")  # EINVAL: kernel < 4.3 has no ambient set


def switch_user(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise IsolationStepError(f"to uid {uid} gid {gid}: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise IsolationStepError(f"to uid {uid} gid {gid}: ids did not stick")


def clear_capabilities() -> None:
    nr = _SYS_CAPSET.get(os.uname().machine)
    if nr is None:
        raise IsolationStepError(f"capset: unknown machine {os.uname().machine!r}")
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _syscall(nr, ctypes.byref(hdr), ctypes.byref(data)) < 0:
        raise _oserror("capset")


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def apply_landlock(plan: dict[str, Any]) -> None:
    """Path rules only: the net rights the plan handles get no rule, so no TCP port is allowed at all."""
    abi = plan["abi"]
    attr = _LandlockRulesetAttr(plan["fs"], plan["net"], plan["scoped"])
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise _oserror("create_ruleset")
    try:
        for path, allowed in plan["paths"]:
            _landlock_path_rule(ruleset, path, allowed)
        if _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) < 0:
            raise _oserror("restrict_self")
    finally:
        os.close(ruleset)


def _landlock_path_rule(ruleset: int, path: str, allowed: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise IsolationStepError(f"open {path}: {exc.strerror}") from None
    try:
        rule = _LandlockPathBeneath(allowed, fd)
        if _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
            raise _oserror(f"add_rule {path}")
    finally:
        os.close(fd)


def load_seccomp(bpf_hex: str) -> None:
    code = bytes.fromhex(bpf_hex)
    if not code or len(code) % 8:
        raise IsolationStepError(f"bad BPF program of {len(code)} bytes")
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), what="PR_SET_SECCOMP")


def find_executable(name: str, path: str) -> str:
    """PATH lookup as the engine user. Not os.execvp: it imports `warnings` lazily, and after the user switch
    the interpreter's own library may be unreadable (a python under /root, say)."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = f"{directory or '.'}/{name}"
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, "No such file or directory")


def _parse_plan(text: str) -> dict[str, Any]:
    import _json  # the C scanner; `json` itself would import `re` and cost ~10 ms

    class _Ctx:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = None

    value, _end = _json.make_scanner(_Ctx())(text, 0)  # type: ignore[arg-type]
    if not isinstance(value, dict):
        raise ValueError("plan is not a JSON object")
    return value


def apply(plan: dict[str, Any]) -> None:
    """Apply every layer of `plan` to the current process, in order; raises IsolationStepError(layer)."""
    steps: list[tuple[str, bool, Any]] = [
        ("cgroup", bool(plan.get("cgroups")), lambda: join_cgroups(plan["cgroups"])),
        ("rlimits", bool(plan.get("rlimits")), lambda: set_rlimits(plan["rlimits"])),
        ("bounding-set", bool(plan.get("bounding")), drop_bounding_set),
        ("ambient-caps", bool(plan.get("caps")), clear_ambient),
        ("user", plan.get("uid") is not None, lambda: switch_user(plan["uid"], plan["gid"])),
        ("workdir", bool(plan.get("workdir")), lambda: os.chdir(plan["workdir"])),
        ("capabilities", bool(plan.get("caps")), clear_capabilities),
        ("no_new_privs", bool(plan.get("nnp")), set_no_new_privs),
        ("landlock", bool(plan.get("landlock")), lambda: apply_landlock(plan["landlock"])),
        ("seccomp", bool(plan.get("seccomp")), lambda: load_seccomp(plan["seccomp"])),
    ]
    for layer, wanted, step in steps:
        if not wanted:
            continue
        try:
            step()
        except IsolationStepError as exc:
            raise IsolationStepError(f"{layer}: {exc}") from None
        except OSError as exc:
            raise IsolationStepError(f"{layer}: {exc.strerror or exc}") from None


def _fail(code: int, message: str) -> NoReturn:
    try:
        os.write(2, f"poolmgr-isolation: {message}\n".encode(errors="replace"))
    finally:
        os._exit(code)


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--":
        _fail(EXIT_ISOLATION_FAILED, "usage: _trampoline.py PLAN_JSON -- ARGV...")
    try:
        plan = _parse_plan(args[0])
    except Exception as exc:  # the C scanner can raise ValueError, StopIteration or SystemError
        _fail(EXIT_ISOLATION_FAILED, f"plan: not valid JSON: {type(exc).__name__}")
    argv = args[2:]
    try:
        apply(plan)
    except IsolationStepError as exc:
        _fail(EXIT_ISOLATION_FAILED, str(exc))
    except Exception as exc:  # never exec unprotected, whatever went wrong
        _fail(EXIT_ISOLATION_FAILED, f"internal: {type(exc).__name__}: {exc}")
    try:
        os.execve(find_executable(argv[0], os.environ.get("PATH", "/usr/bin:/bin")), argv, os.environ)
    except OSError as exc:
        _fail(EXIT_EXEC_FAILED, f"exec: {argv[0]}: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])

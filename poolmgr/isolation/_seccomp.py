"""The seccomp deny-list, compiled once in poolmgr (pyseccomp/libseccomp) to a BPF program the trampoline loads.

Default action: allow. Denied with EPERM: the syscalls below, namespace-creating `clone` flags, and every
`socket`/`socketpair` of AF_INET, AF_INET6 (any type, any protocol) and AF_PACKET. Engines serve on a unix
socket in their workdir, so they need no IP at all; AF_UNIX and AF_NETLINK stay open (glibc asks the kernel
for its interfaces over netlink: getaddrinfo with AI_ADDRCONFIG, if_nameindex). The family is compared on
its low 32 bits only: the kernel reads that argument as an `int`, so high bits set by a raw syscall must not
slip past the rule.

`clone3` gets ENOSYS so libc falls back to `clone`, whose flags seccomp can read (clone3 passes them in
memory). io_uring is denied because its socket operations bypass seccomp's look at socket(); the new mount
API because it is `mount` by other names. The same rules become the OCI profile podman loads
(`_podman.write_seccomp_profile`).
"""

from __future__ import annotations

import errno
import functools
import tempfile
from dataclasses import dataclass

DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace",
    "mount",
    "umount2",
    "unshare",
    "setns",
    "bpf",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "userfaultfd",
    "process_vm_readv",
    "process_vm_writev",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "pivot_root",
)
ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3",)

AF_INET = 2
AF_INET6 = 10
AF_PACKET = 17
DENIED_FAMILIES: tuple[tuple[str, int], ...] = (("AF_INET", AF_INET), ("AF_INET6", AF_INET6), ("AF_PACKET", AF_PACKET))
INT_ARG_MASK = 0xFFFF_FFFF  # an `int` argument: the kernel ignores the high 32 bits, so must the rule

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)


@dataclass(frozen=True)
class ArgRule:
    """One conditional deny: `syscall` when every (arg index, mask, value) holds (mask 0 = plain equality)."""

    syscall: str
    conditions: tuple[tuple[int, int, int], ...]
    reason: str


def _socket_rules() -> list[ArgRule]:
    """Whole families, whatever the type or protocol: a per-type list is how UDP/SCTP/new types slip through."""
    return [
        ArgRule(call, ((0, INT_ARG_MASK, family),), f"{call} {name}")
        for call in ("socket", "socketpair")
        for name, family in DENIED_FAMILIES
    ]


ARG_RULES: tuple[ArgRule, ...] = (
    *_socket_rules(),
    *(ArgRule("clone", ((0, flag, flag),), f"clone flag {flag:#x}") for flag in CLONE_NAMESPACE_FLAGS),
)


def rules_summary() -> str:
    """One line for `doctor` and the per-start isolation log, so both say the same thing."""
    families = "/".join(name for name, _family in DENIED_FAMILIES)
    n = len(DENIED_SYSCALLS) + len(ENOSYS_SYSCALLS)
    return f"deny-list of {n} syscalls, no {families} sockets (TCP and UDP included), no namespace clone flags"


def seccomp_unavailable_reason() -> str | None:
    """None when the kernel can load a filter and pyseccomp can build one; else why not."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return "kernel built without CONFIG_SECCOMP"
        with open("/proc/sys/kernel/seccomp/actions_avail", encoding="ascii") as f:
            if "errno" not in f.read().split():
                return "kernel seccomp lacks the errno action"
    except OSError as exc:
        return f"cannot read seccomp state: {exc.strerror}"
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return f"pyseccomp unusable: {exc}"
    return None


@functools.lru_cache(maxsize=1)
def deny_list_bpf() -> bytes:
    """The deny-list as a raw BPF program for this machine's architecture (cached: it never changes)."""
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ALLOW)
    native = sc.Arch.NATIVE
    for name in DENIED_SYSCALLS:
        if sc.resolve_syscall(native, name) >= 0:  # a name this arch lacks is simply not there to call
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
    for name in ENOSYS_SYSCALLS:
        if sc.resolve_syscall(native, name) >= 0:
            filt.add_rule(sc.ERRNO(errno.ENOSYS), name)
    for rule in ARG_RULES:
        args = [
            sc.Arg(idx, sc.MASKED_EQ, mask, value) if mask else sc.Arg(idx, sc.EQ, value)
            for idx, mask, value in rule.conditions
        ]
        filt.add_rule(sc.ERRNO(errno.EPERM), rule.syscall, *args)
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


__all__ = [
    "ARG_RULES",
    "DENIED_FAMILIES",
    "DENIED_SYSCALLS",
    "ENOSYS_SYSCALLS",
    "ArgRule",
    "deny_list_bpf",
    "rules_summary",
    "seccomp_unavailable_reason",
]

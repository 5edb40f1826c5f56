"""The seccomp deny-list: its socket rules, and the compiled filter loaded for real by each spawner (no root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poolmgr.isolation._prepare import TRAMPOLINE
from poolmgr.isolation._seccomp import (
    ARG_RULES,
    DENIED_FAMILIES,
    deny_list_bpf,
    rules_summary,
    seccomp_unavailable_reason,
)
from poolmgr.isolation._spawner import ensure_spawner, plan_argv

from .conftest import PROBE_CODE

AF_UNIX, AF_NETLINK = 1, 16


def _socket_families() -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"socket": set(), "socketpair": set()}
    for rule in ARG_RULES:
        if rule.syscall in found:
            (index, mask, family), *others = rule.conditions
            assert (index, mask, others) == (0, 0xFFFF_FFFF, [])  # the family alone, its low 32 bits only
            found[rule.syscall].add(family)
    return found


def test_whole_ip_and_packet_families_are_denied_for_socket_and_socketpair() -> None:
    families = {family for _name, family in DENIED_FAMILIES}
    assert families == {2, 10, 17}  # AF_INET, AF_INET6, AF_PACKET
    assert _socket_families() == {"socket": families, "socketpair": families}


def test_unix_and_netlink_sockets_are_left_alone() -> None:
    denied = set().union(*_socket_families().values())
    assert AF_UNIX not in denied and AF_NETLINK not in denied


def test_summary_names_the_denied_families() -> None:
    assert "no AF_INET/AF_INET6/AF_PACKET sockets" in rules_summary()


@pytest.mark.parametrize("spawner", ["python", "c"])
def test_loaded_filter_refuses_ip_sockets_and_keeps_unix_and_netlink(tmp_path: Path, spawner: str) -> None:
    if why := seccomp_unavailable_reason():
        pytest.skip(f"seccomp unavailable: {why}")
    plan = {"nnp": True, "workdir": str(tmp_path), "seccomp": deny_list_bpf().hex()}
    head = [sys.executable, "-I", "-S", str(TRAMPOLINE), json.dumps(plan)]
    if spawner == "c":
        if (helper := ensure_spawner()) is None:
            pytest.skip("no compiled spawner on this host (no C compiler?)")
        head = [str(helper), *plan_argv(plan)]
    cmd = [*head, "--", sys.executable, "-c", PROBE_CODE, "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    for kind in ("tcp_socket", "udp_socket", "tcp6_socket", "udp6_socket", "sctp_socket", "packet_socket"):
        assert probe[kind] == "EPERM", kind
    assert probe["tcp_socket_high_bits"] == "EPERM"  # high bits set on the int family: still AF_INET
    assert probe["inet_socketpair"] == "EPERM"
    assert probe["netlink_socket"] == "ok" and probe["unix_socketpair"] == "ok"
    assert probe["unix_serve_workdir"] == "ok"

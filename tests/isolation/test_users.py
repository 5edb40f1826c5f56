"""The engine's system user: created once by `poolmgr setup`, then only looked up."""

from __future__ import annotations

import grp
import pwd

import pytest

from poolmgr.errors import IsolationError
from poolmgr.isolation import ensure_engine_user
from poolmgr.isolation._users import resolve_ids

from .conftest import TEST_ENGINE_USER


def test_engine_user_is_a_nologin_system_user_with_its_own_group(engine_ids: tuple[int, int]) -> None:
    entry = pwd.getpwnam(TEST_ENGINE_USER)
    assert (entry.pw_uid, entry.pw_gid) == engine_ids
    assert entry.pw_shell.endswith(("nologin", "false"))
    assert grp.getgrgid(entry.pw_gid).gr_name == TEST_ENGINE_USER
    assert 0 < entry.pw_uid < 1000  # a system account


def test_ensure_engine_user_is_idempotent(engine_ids: tuple[int, int]) -> None:
    assert ensure_engine_user(TEST_ENGINE_USER) == engine_ids


def test_group_defaults_to_the_users_primary_group_never_root(engine_ids: tuple[int, int]) -> None:
    assert resolve_ids(TEST_ENGINE_USER, None) == engine_ids
    assert resolve_ids(TEST_ENGINE_USER, "nogroup" if _has_group("nogroup") else 65534)[1] != 0
    assert resolve_ids(12345, None) == (12345, 12345)  # a bare id with no passwd entry


def test_unknown_user_or_group_is_an_isolation_error() -> None:
    with pytest.raises(IsolationError, match="does not exist"):
        resolve_ids("no-such-user-xyz", None)
    with pytest.raises(IsolationError, match="does not exist"):
        resolve_ids(None, "no-such-group-xyz")


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True

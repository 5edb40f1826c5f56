"""Engine isolation: run each engine as an unprivileged, capability-less, sandboxed process.

    spec = build_isolation(pool.isolation, engine_user=..., workdir_root=..., pool_id=...)
    prepared = prepare(spec)                      # workdir, cgroup, one log line: layers in force / skipped
    argv2, env2 = wrap_command(prepared, argv, env)
    subprocess.Popen(argv2, env=env2, start_new_session=True, ...)

`argv2` runs the spawner, which applies the layers to itself and execs the engine in the same pid, or exits
126 with `poolmgr-isolation: <layer>: <reason>` on stderr: the compiled helper (`_spawner.c`, built once by
`ensure_spawner()` into a cache only root can write) where a C compiler works, else the Python trampoline
(`_trampoline.py`; also with POOL_MANAGERD_SPAWNER=python). `doctor()` lists what the host offers.
Engines get no IP network at all (seccomp refuses IPv4/IPv6 sockets, Landlock any TCP bind or connect): they
serve on a unix socket in their workdir, the one place they may create one.

`runtime = "podman"` pools run in a rootless container instead (`podman_command`, run by
`poolmgr.engines.ContainerLauncher`): the same seccomp deny-list as its profile, no capabilities, no_new_privs,
a read-only root, `--network=none`.
"""

from poolmgr.isolation._doctor import LayerStatus, doctor, doctor_table
from poolmgr.isolation._podman import (
    PODMAN_DIR,
    container_name,
    default_profile_path,
    podman_command,
    write_seccomp_profile,
)
from poolmgr.isolation._prepare import LayerDecision, PreparedIsolation, prepare, release, wrap_command
from poolmgr.isolation._spawner import SpawnerState, choose_spawner, ensure_spawner, spawner_state
from poolmgr.isolation._spec import IsolationSpec, build_isolation
from poolmgr.isolation._trampoline import EXIT_EXEC_FAILED, EXIT_ISOLATION_FAILED
from poolmgr.isolation._users import DEFAULT_ENGINE_USER, ensure_engine_user, ensure_subids

__all__ = [
    "DEFAULT_ENGINE_USER",
    "EXIT_EXEC_FAILED",
    "EXIT_ISOLATION_FAILED",
    "PODMAN_DIR",
    "IsolationSpec",
    "LayerDecision",
    "LayerStatus",
    "PreparedIsolation",
    "SpawnerState",
    "build_isolation",
    "choose_spawner",
    "container_name",
    "default_profile_path",
    "doctor",
    "doctor_table",
    "ensure_engine_user",
    "ensure_spawner",
    "ensure_subids",
    "podman_command",
    "prepare",
    "release",
    "spawner_state",
    "wrap_command",
    "write_seccomp_profile",
]

"""Bad settings and pools files, as a new user writes them, fed to the real `poolmgr validate` and `poolmgr serve`.

Each is refused with exit code 2 and one line per problem, naming the file, the pool and the field (or the
setting), without a traceback, and without creating a database: serve runs the same check as validate before it
opens one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.config._run import H100_NVML, HETERO_NVML, NO_NVML, databases, error_lines, run_cli

F = "{file}"  # replaced by the pools file's path
GOOD = '[[pool]]\nid = "p"\nmodel = "/models/m.gguf"\n'


def pool(*lines: str, pid: str = "p") -> str:
    return "\n".join(["[[pool]]", f'id = "{pid}"', 'model = "/models/m.gguf"', *lines]) + "\n"


def iso(*lines: str) -> str:
    return pool("[pool.isolation]", *lines)


@dataclass(frozen=True)
class Case:
    toml: str
    expected: tuple[tuple[str, ...], ...]  # one entry per error line: parts of that line
    env: dict[str, str] = field(default_factory=dict)


def _field(name: str, why: str, pid: str = "p") -> tuple[str, ...]:
    """A line that starts naming the file, the pool and the field, and says why."""
    return (f"{F}: pool {pid!r}: field {name!r}: ", why)


def _setting(*parts: str) -> tuple[str, ...]:
    return parts


H100 = {"POOL_MANAGERD_FAKE_NVML": str(H100_NVML)}
HETERO = {"POOL_MANAGERD_FAKE_NVML": str(HETERO_NVML)}

CASES: dict[str, Case] = {
    # -- the seven a new user got "valid" for ------------------------------------------------------------
    "mask banana": Case(pool('device_mask = "banana"'), (_field("device_mask", "'banana' is not a device id"),)),
    "mask empty item": Case(pool('device_mask = "0,,1"'), (_field("device_mask", "empty entry between commas"),)),
    "mask duplicate": Case(pool('device_mask = "0,0"'), (_field("device_mask", "'0' repeats a device"),)),
    "mask GPU7 on the H100": Case(
        pool('device_mask = "GPU7"'),
        (_field("device_mask", "unknown device '7'; valid: cpu, 0 = GPU0 = GPU-ce457ed6"),),
        H100,
    ),
    "isolation memory_max 8X": Case(iso('memory_max = "8X"'), (_field("isolation.memory_max", "got '8X'"),)),
    "isolation unknown key": Case(
        iso('network = "none"'), (_field("isolation.network", "unknown key (allowed: user, group, seccomp"),)
    ),
    "public address without a token": Case(
        GOOD,
        (_setting("POOL_MANAGERD_ADDR=0.0.0.0:9200: refusing to serve on non-loopback", "POOL_MANAGERD_API_TOKEN"),),
        {"POOL_MANAGERD_ADDR": "0.0.0.0:9200"},
    ),
    # -- the pools file on its own -------------------------------------------------------------------------
    "bad id": Case('[[pool]]\nid = "Bad!"\nmodel = "/m"\n', (_field("id", "must match", pid="Bad!"),)),
    "no id": Case('[[pool]]\nmodel = "/m"\n', (_setting(f"{F}: pool None: field 'id': must match"),)),
    "duplicate id": Case(pool() + pool(), (_field("id", "duplicate pool id"),)),
    "unknown engine": Case(pool('engine = "vllm"'), (_field("engine", "unknown engine 'vllm' (allowed: llamacpp)"),)),
    "unknown runtime": Case(pool('runtime = "docker"'), (_field("runtime", "(allowed: process, podman)"),)),
    "podman without a root": Case(pool('runtime = "podman"'), (_field("runtime", "needs `rootfs"),)),
    "rootfs of a process pool": Case(pool('rootfs = "/srv/root"'), (_field("rootfs", 'only for runtime = "podman"'),)),
    "rootfs not absolute": Case(pool('runtime = "podman"', 'rootfs = "root"'), (_field("rootfs", "absolute path"),)),
    "rootfs and image": Case(
        pool('runtime = "podman"', 'rootfs = "/"', 'image = "x"'), (_field("image", "either rootfs or image"),)
    ),
    "slots 0": Case(pool("slots = 0"), (_field("slots", "must be a positive integer"),)),
    "slots true": Case(pool("slots = true"), (_field("slots", "got True"),)),
    "ctx_size negative": Case(pool("ctx_size = -5"), (_field("ctx_size", "must be a positive integer"),)),
    "ctx_size beyond a C int": Case(pool("ctx_size = 4294967296"), (_field("ctx_size", "at most 2147483647"),)),
    "no model": Case('[[pool]]\nid = "p"\n', (_field("model", "must be a non-empty path"),)),
    "unknown pool field": Case(
        pool('colour = "red"'),
        (_field("colour", "unknown field (allowed: id, served_model_name, engine, model, device_mask"),),
    ),
    "unknown top-level key": Case(
        "wat = 1\n" + GOOD, (_setting(f"{F}: unknown top-level key 'wat' (allowed: [[pool]]"),)
    ),
    "[pool] instead of [[pool]]": Case(
        '[pool]\nid = "p"\nmodel = "/m"\n', (_setting(f"{F}: 'pool' must be", "write [[pool]], not [pool]"),)
    ),
    "not TOML": Case("[[pool]\n", (_setting(f"{F}: not valid TOML"),)),
    "reserved extra_args": Case(pool('extra_args = ["--port", "1"]'), (_field("extra_args", "'--port' is set by"),)),
    "engine socket in extra_args": Case(
        pool('extra_args = ["--host", "/tmp/x.sock"]'), (_field("extra_args", "'--host' is set by"),)
    ),
    "served name in extra_args": Case(
        pool('extra_args = ["--alias", "gpt"]'), (_field("extra_args", "'--alias' is set by"),)
    ),
    "served_model_name with a space": Case(
        pool('served_model_name = "my model"'), (_field("served_model_name", "must be 1-128 characters"),)
    ),
    "served_model_name empty": Case(
        pool('served_model_name = ""'), (_field("served_model_name", "must be 1-128 characters"),)
    ),
    "idle_unload_s zero": Case(pool("idle_unload_s = 0"), (_field("idle_unload_s", "a number of seconds > 0"),)),
    "idle_unload_s a duration": Case(pool('idle_unload_s = "10m"'), (_field("idle_unload_s", "got '10m'"),)),
    "load_on_demand yes": Case(pool('load_on_demand = "yes"'), (_field("load_on_demand", "must be true or false"),)),
    "extra_args not a list": Case(pool('extra_args = "--temp 0"'), (_field("extra_args", "list of strings"),)),
    "share_devices yes": Case(pool('share_devices = "yes"'), (_field("share_devices", "must be true or false"),)),
    "tensor_split empty": Case(pool('device_mask = "0"', "tensor_split = []"), (_field("tensor_split", "non-empty"),)),
    "tensor_split on a CPU pool": Case(pool("tensor_split = [1]"), (_field("tensor_split", "a CPU pool has no"),)),
    "tensor_split for 2 of 1 GPU": Case(
        pool('device_mask = "0"', "tensor_split = [1, 1]"), (_field("tensor_split", "has 2 value(s)"),), H100
    ),
    "mask empty": Case(pool('device_mask = ""'), (_field("device_mask", 'must be "cpu" or GPUs'),)),
    "mask a number": Case(pool("device_mask = 0"), (_field("device_mask", 'must be "cpu" or GPUs'),)),
    "mask cpu twice": Case(pool('device_mask = "cpu,cpu"'), (_field("device_mask", "cannot be combined"),)),
    "mask short uuid": Case(pool('device_mask = "GPU-4090aaaa"'), (_field("device_mask", "not a full uuid"),), HETERO),
    "mask on a MIG-enabled GPU": Case(
        pool('device_mask = "GPU2"'), (_field("device_mask", "has MIG enabled"),), HETERO
    ),
    "two pools on one GPU": Case(
        pool('device_mask = "0,1"', pid="a") + pool('device_mask = "GPU1"', pid="b"),
        (_field("device_mask", "is also in the mask of pool 'a'", pid="b"),),
        HETERO,
    ),
    "isolation not a table": Case(pool('isolation = "strict"'), (_field("isolation", "must be a table"),)),
    "isolation memory_max 0": Case(iso("memory_max = 0"), (_field("isolation.memory_max", "positive byte count"),)),
    "isolation cpu_max max": Case(iso('cpu_max = "max"'), (_field("isolation.cpu_max", "number of CPUs"),)),
    "isolation cpu_max inf": Case(iso("cpu_max = inf"), (_field("isolation.cpu_max", "got inf"),)),
    "isolation cpu_max short period": Case(iso('cpu_max = "5000 10"'), (_field("isolation.cpu_max", "period"),)),
    "isolation pids_max 0": Case(iso("pids_max = 0"), (_field("isolation.pids_max", "positive integer"),)),
    "isolation seccomp yes": Case(iso('seccomp = "yes"'), (_field("isolation.seccomp", "must be true or false"),)),
    "isolation user unknown": Case(
        iso('user = "no-such-user-poolmgr"'), (_field("isolation.user", "no user 'no-such-user-poolmgr' on this"),)
    ),
    "isolation group unknown": Case(
        iso('group = "no-such-group-poolmgr"'), (_field("isolation.group", "no group 'no-such-group-poolmgr'"),)
    ),
    "several problems in one file": Case(
        pool('device_mask = "banana"', "slots = 0", pid="a") + iso('memory_max = "8X"', 'colour = "red"'),
        (
            _field("slots", "positive integer", pid="a"),
            _field("device_mask", "not a device id", pid="a"),
            _field("isolation.memory_max", "got '8X'"),
            _field("isolation.colour", "unknown key"),
        ),
    ),
    "settings and pools file both bad": Case(
        pool("slots = 0"),
        (_setting("POOL_MANAGERD_ADDR=[::]:9200: refusing"), _field("slots", "positive")),
        {"POOL_MANAGERD_ADDR": "[::]:9200"},
    ),
    # -- settings ----------------------------------------------------------------------------------------
    "fake NVML missing": Case(
        pool('device_mask = "0"'),
        (_setting("POOL_MANAGERD_FAKE_NVML='/nonexistent.json': cannot read"),),
        {"POOL_MANAGERD_FAKE_NVML": "/nonexistent.json"},
    ),
    "address without a port": Case(
        GOOD, (_setting("POOL_MANAGERD_ADDR='127.0.0.1': not a valid address"),), {"POOL_MANAGERD_ADDR": "127.0.0.1"}
    ),
    "backoff initial above max": Case(
        GOOD,
        (_setting("POOL_MANAGERD_BACKOFF_INITIAL_MS=90000: must not exceed POOL_MANAGERD_BACKOFF_MAX_MS=60000"),),
        {"POOL_MANAGERD_BACKOFF_INITIAL_MS": "90000"},
    ),
    "log format xml": Case(
        GOOD, (_setting("POOL_MANAGERD_LOG_FORMAT=xml: allowed values"),), {"POOL_MANAGERD_LOG_FORMAT": "xml"}
    ),
    "database url mysql": Case(
        GOOD, (_setting("POOL_MANAGERD_DATABASE_URL=mysql://x: must be"),), {"POOL_MANAGERD_DATABASE_URL": "mysql://x"}
    ),
    "restart rate limit 0": Case(
        GOOD,
        (_setting("POOL_MANAGERD_RESTART_RATE_LIMIT=0: must be a positive"),),
        {"POOL_MANAGERD_RESTART_RATE_LIMIT": "0"},
    ),
}


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30


def _pools_file(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(case.toml, encoding="utf-8")
    return path


def _expect(case: Case, path: Path) -> list[tuple[str, ...]]:
    return [tuple(part.replace(F, str(path)) for part in parts) for parts in case.expected]


@pytest.mark.parametrize("command", ["validate", "serve"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_line_per_problem(tmp_path: Path, name: str, command: str) -> None:
    case = CASES[name]
    path = _pools_file(tmp_path, case)
    state = tmp_path / "state"
    proc = run_cli([command, "--config", str(path)], state, case.env, timeout=20)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == len(proc.stderr.strip().splitlines()) == len(case.expected), proc.stderr
    for head, *rest in _expect(case, path):
        assert [e for e in errors if e.startswith(head) and all(part in e for part in rest)], (head, rest, errors)
    assert databases(state) == [] and not state.exists(), "bad input created the state dir or a database"


def test_without_a_driver_gpu_pools_are_one_warning_line_and_validate_passes(tmp_path: Path) -> None:
    path = _pools_file(tmp_path, Case(pool('device_mask = "0"', pid="g") + pool(pid="c"), ()))
    proc = run_cli(["validate", "--config", str(path)], tmp_path / "state", {"POOL_MANAGERD_FAKE_NVML": str(NO_NVML)})
    assert proc.returncode == 0, proc.stderr
    [warning] = proc.stderr.strip().splitlines()
    assert warning.startswith(f"poolmgr: warning: {path}: GPU pool(s) 'g' will not be placed: no NVIDIA driver")
    assert f"{path}: 2 pool(s) valid: g, c" in proc.stdout


def test_a_public_address_with_a_token_and_good_pools_pass(tmp_path: Path) -> None:
    gpu = pool('device_mask = "GPU0"', "tensor_split = [1]", pid="g")
    path = _pools_file(tmp_path, Case(gpu + iso("cpu_max = 2"), ()))
    env = {**H100, "POOL_MANAGERD_ADDR": "0.0.0.0:9200", "POOL_MANAGERD_API_TOKEN": "t0ken"}
    proc = run_cli(["validate", "--config", str(path)], tmp_path / "state", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "NVIDIA H100 80GB HBM3 GPU-ce457ed6-3363-954f-622b-78199190f4f2" in proc.stdout

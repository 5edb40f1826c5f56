"""Steps of features/config/configuration.feature (B-CONFIG-001..003, 010..013).

The pools-file scenarios run the real `poolmgr validate` / `poolmgr serve` as a user does (a subprocess, with
POOL_MANAGERD_FAKE_NVML naming a recorded NVML snapshot) and read what it prints and what it leaves behind.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.devices import DeviceSnapshot, FakeNvmlBackend, discover
from poolmgr.errors import ConfigError, PoolmgrError
from poolmgr.settings import PoolManagerConfig
from tests.config._run import databases, error_lines, run_cli

from .gpu_fixtures import H100, HETERO, NO_NVML

scenarios("config/configuration.feature")


@dataclass
class Config:
    env: dict[str, str] = field(default_factory=dict)
    settings: PoolManagerConfig | None = None
    error: PoolmgrError | None = None
    nvml: Path | None = None
    workdir: Path = Path()
    proc: subprocess.CompletedProcess[str] | None = None

    @property
    def pools_path(self) -> Path:
        return self.workdir / "pools.toml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def devices(self) -> list[DeviceSnapshot]:
        assert self.nvml is not None
        return discover(FakeNvmlBackend(self.nvml), warn=False).devices

    def result(self) -> subprocess.CompletedProcess[str]:
        assert self.proc is not None, "no poolmgr command ran"
        assert "Traceback" not in self.proc.stderr, self.proc.stderr
        return self.proc


# -- settings ----------------------------------------------------------------------------------------------


@given(parsers.parse('the environment variable POOL_MANAGERD_ADDR is "{addr}"'), target_fixture="cfg")
def env_addr(addr: str) -> Config:
    return Config(env={"POOL_MANAGERD_ADDR": addr, "HOME": "/nonexistent"})


@given("no POOL_MANAGERD_ADDR in the environment", target_fixture="cfg")
def env_without_addr() -> Config:
    cfg = Config(env={"HOME": "/nonexistent"})
    assert "POOL_MANAGERD_ADDR" not in cfg.env
    return cfg


@when("the settings are loaded")
def load_settings(cfg: Config) -> None:
    try:
        cfg.settings = PoolManagerConfig.from_env(cfg.env)
    except ConfigError as exc:
        cfg.error = exc


@then(parsers.parse('the daemon binds host "{host}" on port {port:d}'))
def binds(cfg: Config, host: str, port: int) -> None:
    assert cfg.error is None and cfg.settings is not None
    assert (cfg.settings.host, cfg.settings.port) == (host, port)


@then("the bind address is loopback")
def loopback(cfg: Config) -> None:
    assert cfg.settings is not None and cfg.settings.is_loopback


@then("the bind address is not loopback")
def not_loopback(cfg: Config) -> None:
    assert cfg.settings is not None and not cfg.settings.is_loopback


@then(parsers.parse('loading fails with a configuration error naming POOL_MANAGERD_ADDR and "{why}"'))
def addr_error(cfg: Config, why: str) -> None:
    assert cfg.settings is None and isinstance(cfg.error, ConfigError)
    message = str(cfg.error)
    assert message.startswith("POOL_MANAGERD_ADDR=") and why in message and "\n" not in message


# -- hosts and pools files ---------------------------------------------------------------------------------


def _host(tmp_path: Path, nvml: Path) -> Config:
    return Config(nvml=nvml, workdir=tmp_path, env={"POOL_MANAGERD_FAKE_NVML": str(nvml)})


@given(
    "the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances",
    target_fixture="cfg",
)
def synthetic_host(tmp_path: Path) -> Config:
    cfg = _host(tmp_path, HETERO)
    assert len(cfg.devices) == 5
    return cfg


@given("the GPUs recorded on the real one-GPU H100 host", target_fixture="cfg")
def h100_host(tmp_path: Path) -> Config:
    cfg = _host(tmp_path, H100)
    assert [d.name for d in cfg.devices] == ["NVIDIA H100 80GB HBM3"]
    return cfg


@given("a host without the NVIDIA driver", target_fixture="cfg")
def no_driver_host(tmp_path: Path) -> Config:
    cfg = _host(tmp_path, NO_NVML)
    assert not discover(FakeNvmlBackend(NO_NVML), warn=False).available
    return cfg


def _write(cfg: Config, text: str) -> None:
    cfg.pools_path.write_text(text, encoding="utf-8")
    assert cfg.pools_path.read_text(encoding="utf-8") == text


@given("the pools file")
def pools_file(cfg: Config, docstring: str) -> None:
    assert "[[pool]]" in docstring
    _write(cfg, docstring)


@given(parsers.parse('a pools file with one pool "{pool}" whose device_mask is "{mask}"'))
def one_pool_file(cfg: Config, pool: str, mask: str) -> None:
    _write(cfg, f'[[pool]]\nid = "{pool}"\nmodel = "/models/m.gguf"\ndevice_mask = "{mask}"\n')


@given(parsers.parse('a pools file with one pool "{pool}" whose device_mask is empty'))
def one_pool_empty_mask(cfg: Config, pool: str) -> None:
    one_pool_file(cfg, pool, "")
    assert 'device_mask = ""' in cfg.pools_path.read_text()


@given(parsers.parse('a pools file with one CPU pool "{pool}" whose isolation table sets {key} = {value}'))
def isolation_file(cfg: Config, pool: str, key: str, value: str) -> None:
    _write(cfg, f'[[pool]]\nid = "{pool}"\nmodel = "/models/m.gguf"\n[pool.isolation]\n{key} = {value}\n')


_UNKNOWN_KEYS = {
    "at the top level": 'wat = 1\n[[pool]]\nid = "p"\nmodel = "/m.gguf"\n',
    "in a pool": '[[pool]]\nid = "p"\nmodel = "/m.gguf"\ncolour = "red"\n',
    "in its isolation table": '[[pool]]\nid = "p"\nmodel = "/m.gguf"\n[pool.isolation]\nnetwork = "none"\n',
}


@given(parsers.parse("the pools file with an unknown key {where}"))
def unknown_key_file(cfg: Config, where: str) -> None:
    _write(cfg, _UNKNOWN_KEYS[where])


@given(parsers.parse('POOL_MANAGERD_ADDR is set to "{addr}" without an API token'))
def public_addr(cfg: Config, addr: str) -> None:
    cfg.env["POOL_MANAGERD_ADDR"] = addr
    assert "POOL_MANAGERD_API_TOKEN" not in cfg.env


# -- when: the real command line ---------------------------------------------------------------------------


@when("poolmgr validate checks the pools file")
def run_validate(cfg: Config) -> None:
    cfg.proc = run_cli(["validate", "--config", str(cfg.pools_path)], cfg.state_dir, cfg.env)


@when("poolmgr serve starts with the pools file")
def run_serve(cfg: Config) -> None:
    try:
        cfg.proc = run_cli(["serve", "--config", str(cfg.pools_path)], cfg.state_dir, cfg.env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve did not refuse the pools file: it was still running after 20 s")


@when("the API token is set and poolmgr validate checks the pools file again")
def run_validate_with_token(cfg: Config) -> None:
    cfg.env["POOL_MANAGERD_API_TOKEN"] = "s3cret-token"
    run_validate(cfg)


# -- then --------------------------------------------------------------------------------------------------


@then(parsers.parse("validate accepts {count:d} pools"))
def accepted(cfg: Config, count: int) -> None:
    proc = cfg.result()
    assert proc.returncode == 0, proc.stderr
    assert f"{cfg.pools_path}: {count} pool(s) valid" in proc.stdout.splitlines()[0]
    assert error_lines(proc.stderr) == []
    assert databases(cfg.state_dir) == []


def _placement_line(cfg: Config, pool: str) -> str:
    lines = [line.strip() for line in cfg.result().stdout.splitlines() if line.startswith(f"  {pool}: ")]
    assert len(lines) == 1, cfg.result().stdout
    return lines[0]


@then(parsers.parse('pool "{pool}" runs on the "{name}"'))
def pool_runs_on(cfg: Config, pool: str, name: str) -> None:
    line = _placement_line(cfg, pool)
    uuid = line.rsplit(" ", 1)[-1]
    [device] = [d for d in cfg.devices if d.uuid == uuid]
    assert device.name == name and line.endswith(f"-> {name} {uuid}"), line


@then(parsers.parse('pool "{pool}" runs on the CPU with every GPU hidden'))
def pool_on_cpu(cfg: Config, pool: str) -> None:
    assert _placement_line(cfg, pool) == f"{pool}: cpu (every GPU hidden from its engine)"


@then(parsers.parse('one warning line says GPU pool "{pool}" will not be placed because of "{why}"'))
def warned(cfg: Config, pool: str, why: str) -> None:
    warnings = [line for line in cfg.result().stderr.splitlines() if line.startswith("poolmgr: warning: ")]
    assert len(warnings) == 1, cfg.result().stderr
    assert f"GPU pool(s) {pool!r} will not be placed" in warnings[0] and why in warnings[0]
    assert "'dev'" not in warnings[0]


def _refused(cfg: Config) -> list[str]:
    proc = cfg.result()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = error_lines(proc.stderr)
    assert errors and len(errors) == len(lines), proc.stderr
    assert databases(cfg.state_dir) == [], "a refused start created a database"
    return errors


@then(parsers.parse('it is refused with one line naming pool "{pool}", field "{fld}" and "{why}"'))
def refused_naming(cfg: Config, pool: str, fld: str, why: str) -> None:
    [line] = _refused(cfg)
    assert line.startswith(f"{cfg.pools_path}: pool {pool!r}: field {fld!r}: "), line
    assert why in line, line


@then(parsers.parse('it is refused with one line naming "{what}" and "{why}"'))
def refused_with(cfg: Config, what: str, why: str) -> None:
    [line] = _refused(cfg)
    assert what in line and why in line, line


@then("the error lists the H100's uuid as valid")
def lists_h100(cfg: Config) -> None:
    [line] = _refused(cfg)
    assert f"valid: cpu, 0 = GPU0 = {cfg.devices[0].uuid}" in line


@then("it is refused with these lines, one per problem")
def refused_lines(cfg: Config, datatable: list[list[str]]) -> None:
    header, *rows = datatable
    assert header == ["pool", "field", "why"]
    errors = _refused(cfg)
    assert len(errors) == len(rows), errors
    for pool, fld, why in rows:
        prefix = f"{cfg.pools_path}: pool {pool!r}: field {fld!r}: "
        assert [e for e in errors if e.startswith(prefix) and why in e], (prefix, why, errors)

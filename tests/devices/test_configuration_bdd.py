"""Steps of features/config/configuration.feature (B-CONFIG-001..003 and 010..012)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.devices import (
    DeviceMask,
    DeviceSnapshot,
    FakeNvmlBackend,
    discover,
    engine_env,
    validate_pool_masks,
)
from poolmgr.errors import ConfigError, DeviceError, PoolmgrError
from poolmgr.poolsfile import PoolSpec, parse_pools
from poolmgr.settings import PoolManagerConfig

from .gpu_fixtures import H100, HETERO, NO_NVML

scenarios("config/configuration.feature")


@dataclass
class Config:
    env: dict[str, str] = field(default_factory=dict)
    settings: PoolManagerConfig | None = None
    error: PoolmgrError | None = None
    backend: FakeNvmlBackend | None = None
    pools_text: str = ""
    pools: list[PoolSpec] = field(default_factory=list)
    masks: dict[str, DeviceMask] = field(default_factory=dict)

    @property
    def devices(self) -> list[DeviceSnapshot]:
        assert self.backend is not None
        return discover(self.backend, warn=False).devices


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


# -- pools and device masks --------------------------------------------------------------------------------


@given(
    "the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances",
    target_fixture="cfg",
)
def synthetic_host() -> Config:
    cfg = Config(backend=FakeNvmlBackend(HETERO))
    assert len(cfg.devices) == 5
    return cfg


@given("the GPUs recorded on the real one-GPU H100 host", target_fixture="cfg")
def h100_host() -> Config:
    cfg = Config(backend=FakeNvmlBackend(H100))
    assert len(cfg.devices) == 1
    return cfg


@given("a host without the NVIDIA driver", target_fixture="cfg")
def no_driver_host() -> Config:
    cfg = Config(backend=FakeNvmlBackend(NO_NVML))
    assert cfg.devices == []
    return cfg


@given("the pools file")
def pools_file(cfg: Config, docstring: str) -> None:
    cfg.pools_text = docstring
    assert "[[pool]]" in docstring


@given(parsers.parse('a pools file with one pool "{pool}" whose device_mask is "{mask}"'))
def one_pool_file(cfg: Config, pool: str, mask: str) -> None:
    cfg.pools_text = f'[[pool]]\nid = "{pool}"\nmodel = "/models/m.gguf"\ndevice_mask = "{mask}"\n'


@given(parsers.parse('a pools file with one pool "{pool}" whose device_mask is empty'))
def one_pool_empty_mask(cfg: Config, pool: str) -> None:
    one_pool_file(cfg, pool, "")
    assert 'device_mask = ""' in cfg.pools_text


@when("the pools file is loaded and its masks are validated against the discovered devices")
def load_and_validate(cfg: Config) -> None:
    try:
        cfg.pools = parse_pools(cfg.pools_text, source="pools.toml")
        cfg.masks = validate_pool_masks(cfg.pools, cfg.devices)
    except (ConfigError, DeviceError) as exc:
        cfg.error = exc


@then(parsers.parse('pool "{pool}" runs on the "{name}"'))
def pool_runs_on(cfg: Config, pool: str, name: str) -> None:
    assert cfg.error is None, cfg.error
    [device] = cfg.masks[pool].resolve(cfg.devices)
    assert device.name == name
    assert engine_env(cfg.masks[pool], cfg.devices)["CUDA_VISIBLE_DEVICES"] == device.uuid


@then(parsers.parse('pool "{pool}" runs on the CPU with every GPU hidden'))
def pool_on_cpu(cfg: Config, pool: str) -> None:
    spec = next(p for p in cfg.pools if p.id == pool)
    assert spec.is_cpu and cfg.masks[pool].is_cpu
    assert engine_env(cfg.masks[pool], cfg.devices) == {"CUDA_VISIBLE_DEVICES": ""}


def _device_error(cfg: Config) -> str:
    assert isinstance(cfg.error, DeviceError), f"expected a device mask error, got {cfg.error!r}"
    assert cfg.masks == {}
    message = str(cfg.error)
    assert "\n" not in message
    return message


@then(parsers.parse('validation fails naming pool "{pool}" and the unknown device "{device}"'))
def fails_unknown(cfg: Config, pool: str, device: str) -> None:
    message = _device_error(cfg)
    assert message.startswith(f"pool {pool!r}: ") and f"unknown device {device!r}" in message


@then("the error lists the H100's uuid as valid")
def lists_h100(cfg: Config) -> None:
    assert f"valid: cpu, 0 = GPU0 = {cfg.devices[0].uuid}" in _device_error(cfg)


@then(parsers.parse('validation fails naming pool "{pool}" and "{why}"'))
def fails_with(cfg: Config, pool: str, why: str) -> None:
    message = _device_error(cfg)
    assert message.startswith(f"pool {pool!r}: ") and why in message


@then(parsers.parse('loading the pools file fails naming pool "{pool}" and field "{fld}"'))
def pools_file_fails(cfg: Config, pool: str, fld: str) -> None:
    assert isinstance(cfg.error, ConfigError) and cfg.pools == []
    assert f"pool {pool!r}: field {fld!r}" in str(cfg.error)


@then(parsers.parse('validation fails naming pool "{a}", pool "{b}" and the device "{uuid}"'))
def fails_overlap(cfg: Config, a: str, b: str, uuid: str) -> None:
    message = _device_error(cfg)
    assert f"{a!r}" in message and f"{b!r}" in message and uuid in message

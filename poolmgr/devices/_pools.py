"""Validate the device masks of a set of pools against the discovered devices (startup, reload, API)."""

from __future__ import annotations

from collections.abc import Sequence

from poolmgr.devices._mask import DeviceMask, check_exclusive
from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.errors import DeviceError
from poolmgr.poolsfile import PoolSpec


def validate_pool_masks(pools: Sequence[PoolSpec], devices: Sequence[DeviceSnapshot]) -> dict[str, DeviceMask]:
    """Each pool's parsed mask, by pool id. DeviceError (naming the pool) for a mask that does not parse,
    names a device that is not there, or overlaps another pool's without both sharing."""
    masks: dict[str, DeviceMask] = {}
    for spec in pools:
        try:
            masks[spec.id] = DeviceMask.parse(spec.device_mask)
        except DeviceError as exc:
            raise DeviceError(f"pool {spec.id!r}: {exc}") from None
    check_exclusive([(p.id, masks[p.id], p.share_devices) for p in pools], devices)
    return masks


__all__ = ["validate_pool_masks"]

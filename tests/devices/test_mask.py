"""DeviceMask: every accepted form, every rejection, resolution against discovered devices, CUDA env."""

from __future__ import annotations

import pytest

from poolmgr.devices import DeviceMask, Inventory, check_exclusive, engine_env
from poolmgr.errors import DeviceError

from .gpu_fixtures import CUDA_PROBE, load_json

H100_UUID = "GPU-ce457ed6-3363-954f-622b-78199190f4f2"


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        ("0", (0,)),
        ("0,1", (0, 1)),
        (" 1 , 0 ", (1, 0)),
        ("GPU0,GPU1", (0, 1)),
        ("gpu2", (2,)),
        (H100_UUID, (H100_UUID,)),
        (
            H100_UUID.upper().replace("GPU-", "gpu-"),
            (H100_UUID.upper().replace("GPU-CE", "GPU-ce").lower().replace("gpu-", "GPU-"),),
        ),
        ("MIG-a100cccc-0000-4000-8000-000000000001", ("MIG-a100cccc-0000-4000-8000-000000000001",)),
        (f"MIG-{H100_UUID}/1/0", (f"MIG-{H100_UUID}/1/0",)),
        ("0," + H100_UUID, (0, H100_UUID)),
    ],
)
def test_parse_accepts_indices_names_and_full_uuids(text: str, refs: tuple[object, ...]) -> None:
    mask = DeviceMask.parse(text)
    assert mask.refs == refs
    assert not mask.is_cpu


@pytest.mark.parametrize("text", ["cpu", "CPU", "  cpu  "])
def test_parse_accepts_cpu(text: str) -> None:
    mask = DeviceMask.parse(text)
    assert mask.is_cpu and mask.refs == () and str(mask) == "cpu"


def test_str_is_the_normalised_form() -> None:
    assert str(DeviceMask.parse("GPU1, gpu0")) == "1,0"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0,,1", "empty entry"),
        ("0,", "empty entry"),
        (",0", "empty entry"),
        ("0,0", "repeats"),
        ("0,GPU0", "repeats"),
        (f"{H100_UUID},{H100_UUID.upper()[:4]}{H100_UUID[4:]}", "repeats"),
        ("cpu,0", "cannot be combined"),
        ("0,cpu", "cannot be combined"),
        ("cpu,cpu", "cannot be combined"),
        ("-1", "not a device id"),
        ("1.5", "not a device id"),
        ("gpu", "not a device id"),
        ("cuda:0", "not a device id"),
        ("GPU-ce457ed6", "not a full uuid"),
        ("GPU-zzzzzzzz-3363-954f-622b-78199190f4f2", "not a full uuid"),
        ("MIG-a100cccc", "not a full uuid"),
    ],
)
def test_parse_rejects_with_one_line_naming_the_mask(text: str, why: str) -> None:
    with pytest.raises(DeviceError) as exc:
        DeviceMask.parse(text)
    message = str(exc.value)
    assert why in message and repr(text.strip()) in message
    assert "\n" not in message


def test_resolve_every_form_to_the_same_h100(h100: Inventory) -> None:
    [dev] = h100.devices
    for text in ("0", "GPU0", H100_UUID, H100_UUID.upper().replace("GPU-", "gpu-")):
        assert DeviceMask.parse(text).resolve(h100.devices) == [dev]


def test_unknown_index_names_the_bad_id_and_lists_the_valid_ones(h100: Inventory) -> None:
    with pytest.raises(DeviceError) as exc:
        DeviceMask.parse("0,1").validate_against(h100.devices)
    message = str(exc.value)
    assert "unknown device '1'" in message
    assert "0 = GPU0 = " + H100_UUID in message and "cpu" in message
    assert "\n" not in message


def test_unknown_uuid_is_rejected(h100: Inventory) -> None:
    bogus = "GPU-00000000-0000-0000-0000-000000000000"
    with pytest.raises(DeviceError, match=f"unknown device '{bogus}'.*{H100_UUID}"):
        DeviceMask.parse(bogus).resolve(h100.devices)


def test_without_a_driver_only_cpu_is_valid() -> None:
    assert DeviceMask.parse("cpu").resolve([]) == []
    with pytest.raises(DeviceError, match="no GPU was discovered on this host, only 'cpu' is valid"):
        DeviceMask.parse("0").validate_against([])


def test_every_recorded_cuda_visible_devices_case_is_translated_or_rejected(h100: Inventory) -> None:
    """The real probe: CUDA silently truncated or hid these; poolmgr either names the GPU by uuid or refuses."""
    probe = load_json(CUDA_PROBE)
    for case in probe["cases"]:
        text = case["case"]
        if text is None:
            continue  # CUDA_VISIBLE_DEVICES unset: not a mask
        try:
            mask = DeviceMask.parse(text)
            cvd = mask.to_cuda_visible_devices(h100.devices)
        except DeviceError:
            # "" , "1", "1,0", "-1", the unknown uuid, "0,1" (truncated) and the ambiguous uuid prefix
            assert text in ("", "1", "1,0", "-1", "0,1", "GPU-ce457ed6", "GPU-00000000-0000-0000-0000-000000000000")
            continue
        # "0", "GPU0" (no GPU for CUDA itself!) and the full uuid all reach the engine as the full uuid
        assert cvd == probe["uuid0"], text
        assert text in ("0", "GPU0", probe["uuid0"])


def test_mask_order_is_kept(hetero: Inventory) -> None:
    gpus = hetero.devices
    assert DeviceMask.parse("1,0").uuids(gpus) == [gpus[1].uuid, gpus[0].uuid]
    assert DeviceMask.parse("GPU0,GPU1").to_cuda_visible_devices(gpus) == f"{gpus[0].uuid},{gpus[1].uuid}"


def test_same_gpu_by_index_and_uuid_is_a_duplicate(hetero: Inventory) -> None:
    uuid = hetero.devices[0].uuid
    with pytest.raises(DeviceError, match=f"{uuid} is named twice"):
        DeviceMask.parse(f"0,{uuid}").resolve(hetero.devices)


def test_a_mig_instance_resolves_by_uuid(hetero: Inventory) -> None:
    mig = hetero.devices[3]
    assert DeviceMask.parse(mig.uuid).resolve(hetero.devices) == [mig]
    with pytest.raises(DeviceError, match="unknown device '2000'"):
        DeviceMask.parse(str(mig.index)).resolve(hetero.devices)


@pytest.mark.parametrize("text", ["2", "GPU2", "GPU-a100cccc-1111-2222-3333-444455556666"])
def test_a_mig_enabled_gpu_points_to_its_instances(hetero: Inventory, text: str) -> None:
    with pytest.raises(DeviceError) as exc:
        DeviceMask.parse(text).resolve(hetero.devices)
    message = str(exc.value)
    assert "has MIG enabled" in message
    assert all(m.uuid in message for m in hetero.devices[3:])


def test_engine_env_gives_uuids_and_pci_order(hetero: Inventory) -> None:
    env = engine_env(DeviceMask.parse("GPU1,0"), hetero.devices)
    assert env == {
        "CUDA_VISIBLE_DEVICES": f"{hetero.devices[1].uuid},{hetero.devices[0].uuid}",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def test_engine_env_for_cpu_hides_every_gpu(hetero: Inventory) -> None:
    assert engine_env(DeviceMask.parse("cpu"), hetero.devices) == {"CUDA_VISIBLE_DEVICES": ""}


def test_engine_env_refuses_an_invalid_mask(h100: Inventory) -> None:
    with pytest.raises(DeviceError):
        engine_env(DeviceMask.parse("1"), h100.devices)


@pytest.mark.parametrize("text", ["cpu", "0", "GPU1,GPU0", "MIG-a100cccc-0000-4000-8000-000000000002,0"])
def test_canonical_round_trips_to_the_same_devices(hetero: Inventory, text: str) -> None:
    mask = DeviceMask.parse(text)
    stored = mask.canonical(hetero.devices)
    assert stored == ("cpu" if mask.is_cpu else ",".join(mask.uuids(hetero.devices)))
    again = DeviceMask.parse(stored)
    assert again.resolve(hetero.devices) == mask.resolve(hetero.devices)
    assert again.canonical(hetero.devices) == stored


def test_exclusive_masks_that_do_not_overlap_pass(hetero: Inventory) -> None:
    migs = hetero.devices[3:]
    check_exclusive(
        [
            ("a", DeviceMask.parse("0"), False),
            ("b", DeviceMask.parse("1"), False),
            ("c", DeviceMask.parse(migs[0].uuid), False),
            ("d", DeviceMask.parse(migs[1].uuid), False),
            ("e", DeviceMask.parse("cpu"), False),
            ("f", DeviceMask.parse("cpu"), False),
        ],
        hetero.devices,
    )


@pytest.mark.parametrize(("share_a", "share_b"), [(False, False), (True, False), (False, True)])
def test_overlap_names_both_pools_and_the_device(hetero: Inventory, share_a: bool, share_b: bool) -> None:
    uuid = hetero.devices[1].uuid
    with pytest.raises(DeviceError) as exc:
        check_exclusive(
            [("alpha", DeviceMask.parse("0,1"), share_a), ("beta", DeviceMask.parse(uuid), share_b)],
            hetero.devices,
        )
    message = str(exc.value)
    assert "'alpha'" in message and "'beta'" in message and uuid in message


def test_pools_that_both_share_may_overlap(hetero: Inventory) -> None:
    check_exclusive([("alpha", DeviceMask.parse("0"), True), ("beta", DeviceMask.parse("GPU0"), True)], hetero.devices)


def test_check_exclusive_names_the_pool_with_an_invalid_mask(h100: Inventory) -> None:
    with pytest.raises(DeviceError, match=r"^pool 'beta': device mask '3'"):
        check_exclusive([("alpha", DeviceMask.parse("0"), False), ("beta", DeviceMask.parse("3"), False)], h100.devices)


def test_masks_naming_the_same_ids_are_equal() -> None:
    assert DeviceMask.parse("GPU0,GPU1") == DeviceMask.parse("0, 1")
    assert DeviceMask.parse("CPU") == DeviceMask.parse("cpu")
    assert DeviceMask.parse("0,1") != DeviceMask.parse("1,0")

Feature: GPU pools under serve: fail fast on VRAM, no silent CPU spillover (OC-POOL-3002, OC-POOL-3012)
  GPU pools are placed on discovered devices only. A model that cannot fit is refused before anything is
  spawned; an engine that quietly falls back to the CPU is caught and stopped. The devices come from the
  NVML snapshot recorded on a real H100 (POOL_MANAGERD_FAKE_NVML); the engine is the real llama-server.

  Scenario: A 70B model on one H100 fails fast with insufficient_vram and spawns nothing
    Given a running poolmgr on the recorded H100 with a GPU pool "big" on device "0" for a 70B model with a 131072 context
    Then "big" fails its preload with reason "insufficient_vram"
    And its last_error says how much is needed and how much the H100 has
    And no engine of "big" was ever spawned

  Scenario: A GPU pool whose engine serves on the CPU fails with cpu_spillover and is stopped
    Given a running poolmgr on the recorded H100 with a GPU pool "gpu" on device "GPU0" for the tiny model
    Then "gpu" fails its preload with reason "cpu_spillover"
    And the split plan of "gpu" names the H100's uuid
    And no engine of "gpu" is left running

  Scenario: A GPU pool on an unknown device is refused before serve starts, with the valid ids listed
    Given a pools file on the recorded H100 with a GPU pool "lost" on device "3" for the tiny model
    When poolmgr serve is started with it
    Then serve exits with code 2 and one line naming pool "lost" and field "device_mask"
    And the line lists the valid devices
    And serve created no database and spawned no engine of "lost"

  Scenario: Without an NVIDIA driver GPU pools refuse to place while CPU pools run
    Given a running poolmgr on a host without an NVIDIA driver with a GPU pool "gpu" and a CPU pool "cpu"
    Then "gpu" fails its preload with reason "no_gpu"
    And CPU pool "cpu" is ready

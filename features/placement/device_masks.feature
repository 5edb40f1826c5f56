Feature: Device masks
  A pool's device mask says which GPUs its engine may use. poolmgr parses it strictly, validates it against
  the GPUs NVML discovered, and hands the engine full UUIDs: CUDA itself truncates or ignores bad masks
  silently, and a CUDA engine that sees no GPU serves on the CPU without failing.

  Background:
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances

  Scenario: B-DEVICE-001 a mask of comma-separated GPU indices is parsed
    When the device mask "0,1" is parsed
    Then the mask names the GPU indices 0 and 1
    And it resolves to the "NVIDIA GeForce RTX 4090" and the "NVIDIA GeForce RTX 3060" in that order

  Scenario: B-DEVICE-002 a mask of named GPUs is parsed
    When the device mask "GPU0,GPU1" is parsed
    Then the mask names the GPU indices 0 and 1
    And it equals the mask "0,1"

  Scenario: B-DEVICE-003 a mask is validated against the discovered devices
    Given the GPUs recorded on the real one-GPU H100 host
    When the device mask "0,1" is validated
    Then it is rejected with an error that names the device "1"
    And the error lists the valid ids "0", "GPU0" and the H100's uuid

  Scenario Outline: B-DEVICE-004 invalid device ids are rejected
    When the device mask "<mask>" is validated
    Then it is rejected with an error containing "<why>"

    Examples:
      | mask                                     | why                             |
      | 0,,1                                     | empty entry                     |
      | 0,GPU0                                   | repeats a device                |
      | cpu,0                                    | cannot be combined              |
      | -1                                       | not a device id                 |
      | GPU-4090aaaa                             | not a full uuid                 |
      | 7                                        | unknown device '7'              |
      | GPU-00000000-0000-0000-0000-000000000000 | unknown device                  |
      | 2                                        | has MIG enabled                 |

  Scenario: B-DEVICE-005 a mask converts to the CUDA_VISIBLE_DEVICES format
    When the device mask "GPU1,0" is parsed
    Then CUDA_VISIBLE_DEVICES for it is the uuids of GPU 1 and GPU 0, comma-joined in mask order
    And the "cpu" mask converts to an empty CUDA_VISIBLE_DEVICES

  Scenario: B-DEVICE-010 the engine only uses the GPUs in its device mask
    Given a pool "big" with the device mask "0"
    When its engine runs with the pool's engine environment and NVML attributes it as recorded for a UUID mask
    Then NVML shows the engine on its masked GPU
    And poolmgr's GPU check reports nothing for "big"

  Scenario: B-DEVICE-010 an engine that also uses a GPU outside its mask is caught
    Given a pool "big" with the device mask "0"
    When its engine runs with the pool's engine environment and NVML attributes it as recorded for a UUID mask
    And NVML also lists the engine of "big" on GPU 1
    Then poolmgr's GPU check reports "gpu_spillover" for "big" naming its engine on GPU 1

  Scenario: B-DEVICE-011 no cross-mask spillover goes unnoticed
    Given a pool "big" with the device mask "0"
    And a pool "small" with the device mask "1"
    When both engines run and a child process of the engine of "small" appears on GPU 0 in NVML
    Then poolmgr's GPU check reports "gpu_spillover" for "small" naming that child on GPU 0
    And poolmgr's GPU check reports nothing for "big"

  Scenario: B-DEVICE-011 a MIG instance's engine stays within its instance
    Given a pool "mig" with the device mask of the first MIG instance
    When its engine runs with the pool's engine environment and NVML attributes it as recorded for a UUID mask
    Then NVML shows the engine on its masked GPU
    And poolmgr's GPU check reports nothing for "mig"

  Scenario Outline: B-DEVICE-012 CUDA_VISIBLE_DEVICES is set to full uuids, never the raw mask
    Given the GPUs recorded on the real one-GPU H100 host
    When the engine environment for the mask "<mask>" is built
    Then CUDA_VISIBLE_DEVICES is exactly the H100's uuid
    And CUDA_DEVICE_ORDER is "PCI_BUS_ID"

    Examples:
      | mask                                     |
      | 0                                        |
      | GPU0                                     |
      | GPU-ce457ed6-3363-954f-622b-78199190f4f2 |

  Scenario: B-DEVICE-012 a CPU pool hides every GPU from its engine
    When the engine environment for the mask "cpu" is built
    Then CUDA_VISIBLE_DEVICES is set and empty

  Scenario: B-DEVICE-012 a GPU engine that fell back to the CPU is caught
    Given a pool "big" with the device mask "0"
    When its engine logged the recorded no-GPU stderr and NVML lists no process of it
    Then the engine is not on its masked GPUs
    And its stderr shows a CPU spillover
    And poolmgr's GPU check reports "cpu_spillover" for "big"

  Scenario Outline: B-DEVICE-013 the device mask is persisted in the registry
    When the pools file gives pool "p" the device mask "<mask>" and poolmgr registers it
    Then the registry row of "p" and the pool_registry view hold the mask "<mask>" as configured
    And the stored mask resolves to <devices>, the devices validation found for it

    Examples:
      | mask                                     | devices                                                                           |
      | GPU1,0                                   | GPU-3060bbbb-1111-2222-3333-444455556666,GPU-4090aaaa-1111-2222-3333-444455556666 |
      | cpu                                      | no device                                                                         |
      | MIG-a100cccc-0000-4000-8000-000000000002 | MIG-a100cccc-0000-4000-8000-000000000002                                          |

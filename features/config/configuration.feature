Feature: Configuration
  The daemon reads POOL_MANAGERD_* settings and a pools file. Every bad value is refused up front with one
  line that names the variable, or the file, the pool and the field; `poolmgr validate` and `poolmgr serve`
  run the same check, and serve runs it before it opens the database. The GPUs come from NVML snapshots
  recorded on real hosts (POOL_MANAGERD_FAKE_NVML).

  Scenario: B-CONFIG-001 POOL_MANAGERD_ADDR sets the bind address
    Given the environment variable POOL_MANAGERD_ADDR is "0.0.0.0:9300"
    When the settings are loaded
    Then the daemon binds host "0.0.0.0" on port 9300
    And the bind address is not loopback

  Scenario: B-CONFIG-001 an IPv6 bind address is accepted
    Given the environment variable POOL_MANAGERD_ADDR is "[::1]:9201"
    When the settings are loaded
    Then the daemon binds host "::1" on port 9201
    And the bind address is loopback

  Scenario: B-CONFIG-002 POOL_MANAGERD_ADDR defaults to 127.0.0.1:9200
    Given no POOL_MANAGERD_ADDR in the environment
    When the settings are loaded
    Then the daemon binds host "127.0.0.1" on port 9200
    And the bind address is loopback

  Scenario Outline: B-CONFIG-003 an invalid bind address is an error
    Given the environment variable POOL_MANAGERD_ADDR is "<addr>"
    When the settings are loaded
    Then loading fails with a configuration error naming POOL_MANAGERD_ADDR and "<why>"

    Examples:
      | addr             | why                     |
      | 127.0.0.1        | expected HOST:PORT      |
      | 127.0.0.1:99999  | out of range            |
      | 127.0.0.1:http   | is not a number         |
      | 127.0.0.1:0      | out of range            |
      | bad_host!:9200   | not an IP address       |
      | [::1]9200        | expected HOST:PORT      |

  Scenario: B-CONFIG-010 device masks are configurable per pool
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances
    And the pools file
      """
      [[pool]]
      id = "big"
      model = "/models/big.gguf"
      device_mask = "GPU0"

      [[pool]]
      id = "small"
      model = "/models/small.gguf"
      device_mask = "GPU-3060bbbb-1111-2222-3333-444455556666"

      [[pool]]
      id = "mig"
      model = "/models/mig.gguf"
      device_mask = "MIG-a100cccc-0000-4000-8000-000000000001"

      [[pool]]
      id = "dev"
      model = "/models/tiny.gguf"
      """
    When poolmgr validate checks the pools file
    Then validate accepts 4 pools
    And pool "big" runs on the "NVIDIA GeForce RTX 4090"
    And pool "small" runs on the "NVIDIA GeForce RTX 3060"
    And pool "mig" runs on the "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    And pool "dev" runs on the CPU with every GPU hidden

  Scenario: B-CONFIG-011 device masks are validated against the discovered devices
    Given the GPUs recorded on the real one-GPU H100 host
    And the pools file
      """
      [[pool]]
      id = "pair"
      model = "/models/big.gguf"
      device_mask = "0,1"
      """
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "pair", field "device_mask" and "unknown device '1'"
    And the error lists the H100's uuid as valid

  Scenario: B-CONFIG-011 serve refuses a mask the devices do not have, before it opens the database
    Given the GPUs recorded on the real one-GPU H100 host
    And a pools file with one pool "p" whose device_mask is "GPU7"
    When poolmgr serve starts with the pools file
    Then it is refused with one line naming pool "p", field "device_mask" and "unknown device '7'"
    And the error lists the H100's uuid as valid

  Scenario: B-CONFIG-011 on a host without a driver GPU pools are one warning line
    Given a host without the NVIDIA driver
    And the pools file
      """
      [[pool]]
      id = "dev"
      model = "/models/tiny.gguf"
      device_mask = "cpu"

      [[pool]]
      id = "gpu"
      model = "/models/big.gguf"
      device_mask = "0"
      """
    When poolmgr validate checks the pools file
    Then validate accepts 2 pools
    And one warning line says GPU pool "gpu" will not be placed because of "no NVIDIA driver"
    And pool "dev" runs on the CPU with every GPU hidden

  Scenario Outline: B-CONFIG-012 an invalid device mask is an error
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances
    And a pools file with one pool "p" whose device_mask is "<mask>"
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "p", field "device_mask" and "<why>"

    Examples:
      | mask         | why                |
      | 0,,1         | empty entry        |
      | cpu,1        | cannot be combined |
      | GPU1,1       | repeats a device   |
      | GPU-4090aaaa | not a full uuid    |
      | 9            | unknown device '9' |
      | GPU2         | has MIG enabled    |

  Scenario: B-CONFIG-012 an empty device mask is refused by the pools file itself
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances
    And a pools file with one pool "p" whose device_mask is empty
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "p", field "device_mask" and "or GPU-/MIG- uuids"

  Scenario: B-CONFIG-012 two pools that do not share may not overlap
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances
    And the pools file
      """
      [[pool]]
      id = "a"
      model = "/models/a.gguf"
      device_mask = "0,1"

      [[pool]]
      id = "b"
      model = "/models/b.gguf"
      device_mask = "GPU1"
      """
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "b", field "device_mask" and "GPU-3060bbbb-1111-2222-3333-444455556666 (index 1) is also in the mask of pool 'a'"

  # -- one scenario per class of bad input ------------------------------------------------------------------

  Scenario Outline: B-CONFIG-013 mask syntax is checked even where no driver could tell the devices
    Given a host without the NVIDIA driver
    And a pools file with one pool "p" whose device_mask is "<mask>"
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "p", field "device_mask" and "<why>"

    Examples:
      | mask    | why                |
      | banana  | not a device id    |
      | 0,,1    | empty entry        |
      | 0,0     | repeats a device   |
      | cpu,cpu | cannot be combined |

  Scenario Outline: B-CONFIG-013 a mask naming a device the host does not have is refused
    Given the GPUs recorded on the real one-GPU H100 host
    And a pools file with one pool "p" whose device_mask is "<mask>"
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "p", field "device_mask" and "<why>"
    And the error lists the H100's uuid as valid

    Examples:
      | mask                                     | why                                                   |
      | GPU7                                     | unknown device '7'                                    |
      | GPU-00000000-0000-0000-0000-000000000000 | unknown device 'GPU-00000000-0000-0000-0000-000000000000' |

  Scenario Outline: B-CONFIG-013 every [pool.isolation] value is checked
    Given the GPUs recorded on the real one-GPU H100 host
    And a pools file with one CPU pool "p" whose isolation table sets <key> = <value>
    When poolmgr validate checks the pools file
    Then it is refused with one line naming pool "p", field "isolation.<key>" and "<why>"

    Examples:
      | key        | value                    | why                                   |
      | memory_max | "8X"                     | size like                             |
      | memory_max | 0                        | positive byte count                   |
      | cpu_max    | "max"                    | number of CPUs                        |
      | cpu_max    | "500 100000"             | quota >= 1000                         |
      | pids_max   | 0                        | must be a positive integer            |
      | seccomp    | "yes"                    | must be true or false                 |
      | user       | "no-such-user-poolmgr"   | no user 'no-such-user-poolmgr'        |
      | group      | "no-such-group-poolmgr"  | no group 'no-such-group-poolmgr'      |

  Scenario: B-CONFIG-013 good [pool.isolation] values are accepted
    Given the GPUs recorded on the real one-GPU H100 host
    And a pools file with one CPU pool "p" whose isolation table sets memory_max = "512M"
    When poolmgr validate checks the pools file
    Then validate accepts 1 pools

  Scenario Outline: B-CONFIG-013 unknown keys are refused with the list of allowed ones
    Given the GPUs recorded on the real one-GPU H100 host
    And the pools file with an unknown key <where>
    When poolmgr validate checks the pools file
    Then it is refused with one line naming "<field>" and "<allowed>"

    Examples:
      | where                  | field                       | allowed                                                                     |
      | at the top level       | unknown top-level key 'wat' | allowed: [[pool]] tables                                                    |
      | in a pool              | field 'colour'              | allowed: id, served_model_name, engine, model, device_mask, slots, ctx_size |
      | in its isolation table | field 'isolation.network'   | allowed: user, group, seccomp, landlock, memory_max, cpu_max, pids_max      |

  Scenario: B-CONFIG-013 validate applies serve's bind rule: no public address without a token
    Given the GPUs recorded on the real one-GPU H100 host
    And a pools file with one pool "p" whose device_mask is "cpu"
    And POOL_MANAGERD_ADDR is set to "0.0.0.0:9200" without an API token
    When poolmgr validate checks the pools file
    Then it is refused with one line naming "POOL_MANAGERD_ADDR=0.0.0.0:9200" and "without POOL_MANAGERD_API_TOKEN"
    When poolmgr serve starts with the pools file
    Then it is refused with one line naming "POOL_MANAGERD_ADDR=0.0.0.0:9200" and "without POOL_MANAGERD_API_TOKEN"
    When the API token is set and poolmgr validate checks the pools file again
    Then validate accepts 1 pools

  Scenario: B-CONFIG-013 several problems in one file are all reported, one line each
    Given the GPUs recorded on the real one-GPU H100 host
    And the pools file
      """
      [[pool]]
      id = "a"
      model = "/models/a.gguf"
      device_mask = "banana"
      slots = 0

      [[pool]]
      id = "b"
      model = "/models/b.gguf"
      device_mask = "GPU7"
      [pool.isolation]
      memory_max = "8X"
      """
    When poolmgr validate checks the pools file
    Then it is refused with these lines, one per problem
      | pool | field                | why                 |
      | a    | slots                | positive integer    |
      | a    | device_mask          | not a device id     |
      | b    | isolation.memory_max | size like           |
      | b    | device_mask          | unknown device '7'  |
    When poolmgr serve starts with the pools file
    Then it is refused with these lines, one per problem
      | pool | field                | why                 |
      | a    | slots                | positive integer    |
      | a    | device_mask          | not a device id     |
      | b    | isolation.memory_max | size like           |
      | b    | device_mask          | unknown device '7'  |

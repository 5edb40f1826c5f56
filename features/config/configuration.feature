Feature: Configuration
  The daemon reads POOL_MANAGERD_* settings and a pools file. Every bad value is refused up front with one
  line that names the variable or the pool.

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
    When the pools file is loaded and its masks are validated against the discovered devices
    Then pool "big" runs on the "NVIDIA GeForce RTX 4090"
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
    When the pools file is loaded and its masks are validated against the discovered devices
    Then validation fails naming pool "pair" and the unknown device "1"
    And the error lists the H100's uuid as valid

  Scenario: B-CONFIG-011 a host without a driver accepts only CPU pools
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
    When the pools file is loaded and its masks are validated against the discovered devices
    Then validation fails naming pool "gpu" and "only 'cpu' is valid"

  Scenario Outline: B-CONFIG-012 an invalid device mask is an error
    Given the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances
    And a pools file with one pool "p" whose device_mask is "<mask>"
    When the pools file is loaded and its masks are validated against the discovered devices
    Then validation fails naming pool "p" and "<why>"

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
    When the pools file is loaded and its masks are validated against the discovered devices
    Then loading the pools file fails naming pool "p" and field "device_mask"

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
    When the pools file is loaded and its masks are validated against the discovered devices
    Then validation fails naming pool "a", pool "b" and the device "GPU-3060bbbb-1111-2222-3333-444455556666"

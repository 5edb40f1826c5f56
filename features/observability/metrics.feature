Feature: Prometheus metrics
  poolmgr serves Prometheus metrics on GET /metrics of its API port. Counters and histograms are derived from
  the audit table at scrape time (so a restart of poolmgr keeps them), gauges come from the registry and the
  GPUs, and every serving engine's own llamacpp:* metrics are re-exposed with a pool_id label.

  Background:
    Given a running poolmgr on the recorded H100 with a pool "obs-b-good" of 2 slots and a pool "obs-b-bad" whose model is missing
    And the engine of "obs-b-good" was killed once and came back
    And the circuit breaker of "obs-b-bad" is open

  Scenario: B-METRICS-001 preloads that reached ready are counted per pool and engine
    When Prometheus scrapes /metrics
    Then pool_preload_success_total of "obs-b-good" for engine "llamacpp" equals its preload_ok audit rows
    And pool_preload_success_total of "obs-b-bad" for engine "llamacpp" is 0

  Scenario: B-METRICS-002 failed preloads are counted with their reason
    When Prometheus scrapes /metrics
    Then pool_preload_failure_total of "obs-b-bad" counts its preload_failed audit rows per reason
    And every pool_preload_failure_total sample has the labels pool_id, engine and reason

  Scenario: B-METRICS-003 the total VRAM of every device is a gauge
    When Prometheus scrapes /metrics
    Then device_vram_total_bytes of every GPU of the NVML snapshot is its total memory

  Scenario: B-METRICS-004 the free VRAM of every device is a gauge
    When Prometheus scrapes /metrics
    Then device_vram_free_bytes of every GPU of the NVML snapshot is its free memory

  Scenario: B-METRICS-005 engine failures from a GPU driver error are counted as driver resets
    Given the engine of a pool "obs-b-gpu" died of a GPU driver error
    When Prometheus scrapes /metrics
    Then driver_reset_total of "obs-b-gpu" is 1
    And engine_crash_total of "obs-b-gpu" with reason "driver_error" is 1
    And driver_reset_total of "obs-b-good" is 0

  Scenario: B-METRICS-006 restarts are counted per pool, labelled with the failure before them
    When Prometheus scrapes /metrics
    Then pool_restart_total of "obs-b-good" with the reason of its crash is 1
    And pool_restart_total of "obs-b-bad" with the reason of its first failure is 1

  Scenario: B-METRICS-007 backoff delays are a histogram per pool
    When Prometheus scrapes /metrics
    Then backoff_delay_ms of "obs-b-good" counts and sums its back_off audit rows
    And the backoff_delay_ms buckets of "obs-b-good" are cumulative up to +Inf

  Scenario: B-METRICS-008 the slots of a pool are a gauge
    When Prometheus scrapes /metrics
    Then pool_slots_total of "obs-b-good" is 2
    And pool_slots_total of every pool is what its status says

  Scenario: B-METRICS-009 the free slots of a pool follow its leases
    When a lease is taken on "obs-b-good"
    And Prometheus scrapes /metrics
    Then pool_slots_free of "obs-b-good" is 1
    When the lease is released
    And Prometheus scrapes /metrics
    Then pool_slots_free of "obs-b-good" is 2

  Scenario: B-METRICS-010 the active leases of a pool are a gauge
    When a lease is taken on "obs-b-good"
    And Prometheus scrapes /metrics
    Then pool_active_leases of "obs-b-good" is 1
    And pool_active_leases of "obs-b-bad" is 0
    When the lease is released
    And Prometheus scrapes /metrics
    Then pool_active_leases of "obs-b-good" is 0

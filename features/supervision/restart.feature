Feature: Supervision of crashed engines (B-SUPER, OC-POOL-3010, OC-POOL-3011)
  poolmgr brings a crashed engine back on its own, with backoff, and stops burning the machine on a pool
  that cannot start: a circuit breaker opens after repeated failed starts and allows no attempt until its
  timeout. Real serve, real llama-server, real tiny model.

  Scenario: A SIGKILLed engine is restarted after backoff with restart_count + 1
    Given a running poolmgr with a ready pool "tiny" on the tiny model
    When the engine of "tiny" is killed with SIGKILL
    Then "tiny" records a crash with reason "signal" and signal 9
    And "tiny" backs off and is ready again with restart_count 1 and a new pid
    And completions to "tiny" work

  Scenario: A pool whose model is missing ends in breaker-open and stops trying
    Given a running poolmgr with breaker threshold 3 and a pool "broken" whose model is missing
    Then "broken" reaches state "breaker-open"
    And "broken" made exactly 3 failed starts
    And "broken" makes no start attempt for 2 seconds
    And its last_error says "failed to open GGUF file"

  Scenario: After its timeout an open breaker allows exactly one trial start, then reopens with a doubled timeout
    Given a running poolmgr with breaker threshold 2, breaker timeout 1 s and a pool "broken" whose model is missing
    Then "broken" reaches state "breaker-open"
    And after the timeout "broken" made exactly 1 trial start and reopened with a 2 s timeout

  Scenario: An operator resets an open breaker by hand
    Given a running poolmgr with breaker threshold 3 and a pool "broken" whose model is missing
    Then "broken" reaches state "breaker-open"
    When the breaker of "broken" is reset
    Then the audit of "broken" shows a manual breaker reset followed by a new start

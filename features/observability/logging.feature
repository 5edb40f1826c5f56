Feature: Structured logs
  `poolmgr serve` writes one JSON object per line on stderr (POOL_MANAGERD_LOG_FORMAT=json, the default; text
  for a terminal). The lines of a pool's lifecycle carry its pool_id, engine, engine_version and device_mask;
  restart lines the restart_count, backoff lines the backoff_ms and next_restart_at, failure lines the
  last_error. What needs a person (breaker open, restart storm, kernel OOM kill, GPU lost) is `critical`.

  Background:
    Given `poolmgr serve` ran a pool "obs-l-good" and a pool "obs-l-bad" whose model is missing
    And the engine of "obs-l-good" was killed once and came back
    And the circuit breaker of "obs-l-bad" opened before poolmgr was stopped
    And a pool "obs-l-drain" was drained while it held a lease

  Scenario: B-LOG-001 pool lines carry the pool_id
    When its log is read
    Then every line that names a pool carries that pool's pool_id
    And both pools have lines

  Scenario: B-LOG-001..004 every line naming a pool carries its fields, whichever layer wrote it
    When its log is read
    Then every line with a pool_id, isolation and spawn lines included, carries engine, engine_version and device_mask
    And the isolation and spawn lines of "obs-l-good" are among them

  Scenario: B-LOG-002 pool lines carry the engine
    When its log is read
    Then every lifecycle line of a pool carries engine "llamacpp"

  Scenario: B-LOG-003 pool lines carry the engine version
    When its log is read
    Then the lines saying "obs-l-good" is ready carry the engine_version its status reports

  Scenario: B-LOG-004 pool lines carry the device mask
    When its log is read
    Then every lifecycle line of a pool carries device_mask "cpu"

  Scenario: B-LOG-005 restart lines carry the restart count
    When its log is read
    Then the restart lines of "obs-l-bad" and "obs-l-good" carry the restart_count of their retry audit rows

  Scenario: B-LOG-006 backoff lines carry the backoff delay
    When its log is read
    Then the backoff lines of both pools carry the backoff_ms of their back_off audit rows

  Scenario: B-LOG-006 backoff lines say when the next restart is due
    When its log is read
    Then the backoff lines of both pools carry a next_restart_at backoff_ms after the line

  Scenario: Crash, breaker and drain lines say what an operator needs
    When its log is read
    Then the crash line of "obs-l-good" carries signal 9, no exit_code and the engine's uptime
    And the circuit breaker line of "obs-l-bad" is critical and carries its old and new state and failure count
    And the drain of "obs-l-drain" started with a warning saying 1 lease was still held

  Scenario: B-LOG-007 failure lines carry the last error
    When its log is read
    Then the preload failure lines of "obs-l-bad" carry the last_error of its audit rows
    And the crash line of "obs-l-good" carries the last_error of its crash
    And the circuit breaker line of "obs-l-bad" carries its last_error

  Scenario: B-LOG-008 the log is one JSON object per line
    When its log is read
    Then every line is one JSON object with an ISO-8601 timestamp, a level and a message

  Scenario: B-LOG-008 POOL_MANAGERD_LOG_FORMAT=text writes plain lines instead
    Given `poolmgr serve` ran with POOL_MANAGERD_LOG_FORMAT=text and a pool "obs-l-text" whose model is missing
    When its log is read
    Then no line is JSON and the backoff line of "obs-l-text" says "pool_id=obs-l-text" and "backoff_ms="

  Scenario: A pool whose isolation cannot be prepared ends breaker-open with one traceback
    Given `poolmgr serve` ran a pool "obs-l-noiso" whose engine workdir cannot be created
    When its log is read
    Then "obs-l-noiso" is breaker-open with a last_error naming the isolation failure
    And its isolation failed exactly as often as the breaker threshold, with reason isolation_error
    And exactly one line of the log carries a traceback

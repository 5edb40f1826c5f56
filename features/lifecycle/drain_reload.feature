Feature: Drain, reload and leases (B-DRAIN, B-RELOAD, B-REG leases, ORCH-3505, ORCH-3031, ORCH-3038)
  An operator takes a pool out of service without dropping its work, and reloads it atomically: a failed
  reload really restarts the old model. Real serve, real llama-server, real tiny model.

  Scenario: A drain with an open lease waits, then force-stops at the deadline
    Given a running poolmgr with a ready pool "tiny" on the tiny model
    And a lease on "tiny"
    When "tiny" is drained with a deadline of 1500 ms
    Then a new lease on "tiny" is refused with 409
    And "tiny" is still draining after 500 ms
    And "tiny" ends stopped with force_stopped true and 1 final lease
    And no engine of "tiny" is running

  Scenario: A drain without leases stops at once, and preload starts the pool again
    Given a running poolmgr with a ready pool "tiny" on the tiny model
    When "tiny" is drained with a deadline of 60000 ms
    Then "tiny" ends stopped with force_stopped false and 0 final lease
    When "tiny" is preloaded
    Then "tiny" is ready again

  Scenario: A reload to a corrupt model rolls back and the old engine serves again
    Given a running poolmgr with a ready pool "tiny" on the tiny model
    When "tiny" is reloaded to the corrupt model
    Then "tiny" is ready again on the tiny model
    And the audit of "tiny" shows the failed reload and the rollback
    And completions to "tiny" work

  Scenario: A reload to a good model switches the pool
    Given a running poolmgr with a ready pool "tiny" on the tiny model
    When "tiny" is reloaded to the second tiny model
    Then "tiny" is ready again on the second tiny model

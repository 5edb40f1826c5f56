Feature: The pool registry (B-REG)
  The registry is the contract with orchestratord: every pool's state, health, slots and leases, stored in
  SQLite or PostgreSQL, with every state change audited in the same transaction.

  Scenario Outline: Register a pool and read its snapshot
    Given an empty registry on <database>
    When pool "alpha" is registered with 3 slots on device mask "cpu"
    Then pool "alpha" is in state "discovered" with 3 slots total and 0 free
    And pool "alpha" has device mask "cpu" in the pool_registry view
    And the audit of "alpha" holds 1 row of kind "registered"

    Examples:
      | database   |
      | sqlite     |
      | postgresql |

  Scenario: Deregister a pool; an unknown pool is "not found", never a crash
    Given an empty registry on sqlite
    And pool "alpha" is registered with 1 slots on device mask "cpu"
    When pool "alpha" is deregistered
    Then reading pool "alpha" says not found
    And the active leases of pool "alpha" are 0

  Scenario: Free slots stay in the range zero to total
    Given an empty registry on sqlite
    And pool "alpha" is registered with 4 slots on device mask "cpu"
    Then pool "alpha" has 0 free slots
    When pool "alpha" becomes ready
    Then pool "alpha" has 4 free slots
    When 4 leases are taken on "alpha"
    Then pool "alpha" has 0 free slots
    And a lease on "alpha" is refused because it has no free slot
    And pool "alpha" has 0 free slots

  Scenario: Leases are refused while draining and the count stays unchanged
    Given an empty registry on sqlite
    And a ready pool "alpha" with 2 slots
    And a lease on "alpha"
    When pool "alpha" starts draining
    Then a lease on "alpha" is refused because it is draining
    And the active leases of pool "alpha" are 1

  Scenario: Releasing leases never goes below zero
    Given an empty registry on sqlite
    And a ready pool "alpha" with 2 slots
    And a lease on "alpha"
    When the lease is released twice
    Then the active leases of pool "alpha" are 0
    And pool "alpha" has 2 free slots

  Scenario: Expired leases are reaped so a lost release cannot leak a slot
    Given an empty registry on sqlite
    And a ready pool "alpha" with 1 slots
    And a lease on "alpha" for 10 seconds
    When 11 seconds pass and expired leases are reaped
    Then the active leases of pool "alpha" are 0
    And pool "alpha" has 1 free slots

  Scenario: Snapshots are sorted by pool id
    Given an empty registry on sqlite
    And pool "zeta" is registered with 1 slots on device mask "cpu"
    And pool "alpha" is registered with 1 slots on device mask "cpu"
    And pool "mid" is registered with 1 slots on device mask "cpu"
    Then the snapshot lists pools "alpha, mid, zeta" in that order

Feature: A fleet of nodes on one PostgreSQL: reachability and a dead node (issue 16)
  Three poolmgr nodes, each on its own host (a network namespace) with its own state dir and a real llama-server
  on a tiny model, share one PostgreSQL. A client on a fourth host reaches a pool only through its node's
  endpoint_url, with a token. The fleet view says which pools are routable: ready, not draining, and on a node
  whose last heartbeat is younger than its grace; nobody writes anything for a dead node's pools.

  Scenario: A node killed with -9 leaves the routable pools within the grace, and nothing else changes
    Given three nodes on their own hosts, each serving one ready tiny pool
    Then the client reaches every pool through its endpoint_url with an inference token
    And the client is refused with 401 without a token
    And no node's port answers on the loopback of another host
    When the poolmgr of node-b is killed with signal 9
    Then the pool of node-b is not routable within the grace, and its engine still runs
    And the pools of node-a and node-c are routable, unchanged, with the same engines
    And the client still reaches the pools of node-a and node-c

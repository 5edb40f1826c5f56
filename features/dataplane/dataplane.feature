Feature: The node data plane holds requests across a pool's lifecycle (B-PROXY, issue 15)
  Engines listen on unix sockets only; every request reaches a pool through the node's one port, counts as in
  flight on it, and is held, refused or cut according to what the pool is doing. Real serve, real llama-server.

  Scenario: A reload under a steady stream of requests fails none of them
    Given a node serving a ready pool "tiny" on the tiny model
    And 4 clients sending chat completions to "tiny" through the node without pause
    When "tiny" is reloaded to the second tiny model through the API
    Then the new engine of "tiny" serves the second tiny model
    And after 1 more second every request the clients sent was answered 200

  Scenario: A drain waits for a request that is still generating, then stops the engine
    Given a node serving a ready pool "tiny" on the tiny model
    And a long generation running on "tiny" through the node
    When "tiny" is drained through the API with a deadline of 60000 ms
    Then a new request to "tiny" is refused with 503 and Retry-After
    And the long generation ends with all its tokens
    And "tiny" ends stopped with drain outcome "drained" and 0 cut requests

  Scenario: A drain past its deadline cuts the request still running and says so
    Given a node serving a ready pool "tiny" on the tiny model
    And a long generation running on "tiny" through the node
    When "tiny" is drained through the API with a deadline of 100 ms
    Then the long generation ends without all its tokens
    And "tiny" ends stopped with drain outcome "forced" and 1 cut requests
    And the log of poolmgr says the request was cut

  Scenario: A request to a pool that is starting waits for it and is answered
    Given a node serving a ready pool "tiny" on the tiny model
    And "tiny" was drained
    When "tiny" is preloaded and a chat completion for "tiny" is sent through the node at once
    Then the chat completion is answered 200 by the new engine

  Scenario: A pool whose breaker is open refuses requests at once with the reason
    Given a node with breaker threshold 1 serving a pool "broken" whose model is missing
    When the breaker of "broken" is open
    Then a chat completion for "broken" is refused at once with 503 naming the open breaker

  Scenario: An idle pool with load_on_demand unloads, and a request to it starts it again and is answered
    Given a node serving a ready pool "tiny" with load_on_demand and idle_unload_s 2
    When "tiny" has no request for a while
    Then "tiny" is unloaded as idle: stopped, no engine left, the audit saying idle_unload
    When a chat completion for "tiny" is sent through the node
    Then the chat completion is answered 200 by the new engine
    And the audit of "tiny" says the request started it (load_on_demand)

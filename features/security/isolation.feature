Feature: Engine isolation
  Engines never run as root when poolmgr does: each runs as the engine user, in its own workdir,
  with no capabilities, no_new_privs, Landlock and a seccomp deny-list. Engines have no network: they
  serve on a unix socket in their workdir, and every IPv4/IPv6 socket is refused to them. Containers run
  rootless under podman with the same deny-list as their seccomp profile and no network either.

  Background:
    Given poolmgr runs as root and the engine user exists

  Scenario: B-SEC-001 engine processes run as a non-root user
    When a pool's engine is started through the isolation layer
    Then every uid and gid of the engine is the engine user's, none is 0
    And the engine has no supplementary groups

  Scenario: B-SEC-002 engine processes have an isolated workdir
    When a pool's engine is started through the isolation layer
    Then the engine's working directory is the pool's workdir, mode 0700, owned by the engine user
    And the engine cannot write outside its workdir (skipped where the kernel has no Landlock)
    And the engine serves on a unix socket in its workdir, which poolmgr reaches
    And the engine cannot create a unix socket outside its workdir (skipped where the kernel has no Landlock)

  Scenario: B-SEC-003 engine processes have minimal capabilities
    When a pool's engine is started through the isolation layer
    Then all five capability sets of the engine are empty
    And the engine runs with no_new_privs and a seccomp filter
    And ptrace and every IPv4 and IPv6 socket, TCP and UDP alike, are refused to the engine
    And Landlock alone refuses the engine any TCP bind or connect (skipped where Landlock ABI < 4)

  Scenario: B-SEC-010 containers run rootless (run step skipped where podman is missing)
    Given a pool that runs its engine in a podman container
    When poolmgr builds the container command
    Then podman is started as the engine user with a clean environment
    And the container drops every capability and sets no-new-privileges
    And in the running container the host sees only the engine user (skipped where podman is missing)
    And seen from the host the container's engine has a non-zero uid, no capabilities, no_new_privs and seccomp (skipped where podman is missing)

  Scenario: B-SEC-011 containers have a seccomp profile (run step skipped where podman is missing)
    Given a pool that runs its engine in a podman container
    When poolmgr builds the container command
    Then the command loads poolmgr's profile, which denies the process sandbox's syscalls
    And in the running container a TCP socket is refused (skipped where podman is missing)
    And in the running container a syscall the profile denies fails (skipped where podman is missing)

  Scenario: B-SEC-012 containers have no network access
    Given a pool that runs its engine in a podman container
    When poolmgr builds the container command
    Then the container has no network at all and publishes no port
    And in the running container loopback is the only interface (skipped where podman is missing)
    And in the running container only the workdir is writable (skipped where podman is missing)
    And the engine's unix socket in its mounted workdir reaches the host (skipped where podman is missing)

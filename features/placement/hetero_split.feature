Feature: Heterogeneous GPU split planning
  A pool whose device mask names several GPUs runs one llama-server across them with `--split-mode layer`.
  poolmgr estimates the model's VRAM need from its GGUF header, shares whole layers out over the GPUs in
  proportion to what each can hold, caps the small ones, checks every device the way llama.cpp really
  places layers, and hands llama-server the `--tensor-split` ratios (OC-POOL-3021, OC-POOL-3052).

  Background:
    Given the synthetic host with an RTX 4090, an RTX 3060 and an A100

  Scenario: B-HETERO-001 SplitPlan computes ratios for a multi-GPU setup
    Given a 70B-class Q4_K model with a context of 8192 tokens in 1 slot
    When the model is planned over the devices "0,1,2"
    Then the plan has one ratio per device in mask order
    And the ratios follow the room each device has for layers to within a layer
    And llama.cpp would place the planned layers from the ratios

  Scenario: B-HETERO-002 Split ratios sum to 1.0
    Given a 70B-class Q4_K model with a context of 16384 tokens in 4 slots
    When the model is planned over the devices "0,1,2"
    Then the ratios sum to 1.0
    And the --tensor-split flag holds the same ratios

  Scenario: B-HETERO-003 Smallest GPU capacity is respected
    Given a 70B-class Q4_K model with a context of 65536 tokens in 1 slot
    When the model is planned over the devices "0,1,2"
    Then no device is planned more than its free VRAM less the headroom
    And the "RTX 3060" keeps at least the headroom free

  Scenario: B-HETERO-004 Split ratios are capped for the smallest GPU
    Given a 70B-class Q4_K model with a context of 65536 tokens in 1 slot
    When the model is planned over the devices "0,1,2"
    Then the ratio of the "RTX 3060" is below its share of the free VRAM
    And ratios proportional to free VRAM are refused because the "RTX 3060" is over by some GiB

  Scenario: B-HETERO-005 SplitPlan validates that the model fits the smallest GPU's share
    Given a 70B-class Q4_K model with a context of 8192 tokens in 1 slot
    When the tensor split "1,8,1" is validated over the devices "0,1,2"
    Then the plan is refused for insufficient VRAM naming the "RTX 3060" with what it needs and has
    And the tensor split "1,0.25,3" over the devices "0,1,2" is accepted as given

  Scenario: B-HETERO-006 Default is no split (single GPU)
    Given the recorded host with one H100
    And the tiny model with a context of 2048 tokens in 4 slots
    When the model is planned over the devices "0"
    Then the plan is a single ratio of 1.0 with no split flags
    And every layer and the output layer are on that device

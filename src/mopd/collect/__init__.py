"""The data half of a training step: sample G rollouts per prompt, verify them, and build
each rollout's teacher input from its peers. Flows one way: nothing here trains."""

"""The RL step's components: rollouts (rollout.py, generator.py), verifiable rewards, GRPO advantages,
experience tensors, frozen scorers for teacher and reference, and the student train module."""

"""RL pieces: verifiable rewards and GRPO advantages (rollout lives in rollout.py)."""

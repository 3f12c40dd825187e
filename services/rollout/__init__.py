"""The rollout service: staged canary rollouts, per-device executions and the pure planner."""

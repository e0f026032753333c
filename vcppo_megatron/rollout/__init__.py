"""vLLM rollout engine and weight resharding (issue 5; not yet implemented)."""

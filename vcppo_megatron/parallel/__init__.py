"""Process groups for actor, critic and rollout; launcher environment (torchrun, SLURM) (issues 4, 7; not yet implemented)."""

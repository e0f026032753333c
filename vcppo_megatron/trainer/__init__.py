"""Training phases (today: the single-process demo loop)."""

"""Process groups per role (`groups.py`), launcher environment for torchrun and SLURM (`launch.py`),
layout validation and the per-GPU memory plan (`memory_plan.py`)."""

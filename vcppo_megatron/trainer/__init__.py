"""The trainer: `loop.Trainer` runs SFT -> value pretraining -> RL on every rank (`python -m
vcppo_megatron.train`); `experience.py` turns samples into training tensors, `ppo.py` runs the
PPO updates on the engines, `setup.py` builds what a run needs, `evaluation.py` scores held-out
sets, `signals.py` turns SIGTERM / SIGUSR1 into a checkpoint-and-exit request."""

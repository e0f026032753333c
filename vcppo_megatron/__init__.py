"""vcppo_megatron: VC-PPO and VAPO for long chain-of-thought RL on Megatron-Core and vLLM."""

__version__ = "0.1.0"

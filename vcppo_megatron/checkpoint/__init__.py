"""HF <-> Megatron adapters and distributed checkpoints (issue 4; not yet implemented)."""

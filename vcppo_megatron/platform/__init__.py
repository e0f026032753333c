"""Device choice and the CPU compatibility layer for Megatron-Core (issue 4; not yet implemented)."""

"""Device choice and the CPU compatibility layer for Megatron-Core."""
from vcppo_megatron.platform.cpu_compat import (
    CudaToCpuMode,
    apply_cpu_compat,
    cpu_compat_applied,
    cuda_to_cpu_suspended,
    setup_device,
)

__all__ = ["CudaToCpuMode", "apply_cpu_compat", "cpu_compat_applied", "cuda_to_cpu_suspended",
           "setup_device"]

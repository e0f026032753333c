"""RMSNorm for the local (non-Transformer-Engine) layer spec that also works with sequence parallelism."""
from __future__ import annotations

from typing import Any

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm behind Megatron's norm-submodule signature (config, hidden_size, eps).

    It normalises each token on its own, so it runs unchanged on a sequence shard. Under
    `config.sequence_parallel` its weight is marked `sequence_parallel`: each TP rank then saw only
    its shard of the tokens, and megatron's finalize_model_grads all-reduces such gradients over
    the TP ranks, as it does for Transformer Engine's norms. Megatron's own torch fallback
    (WrappedTorchNorm) refuses sequence parallelism for want of that mark.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused: Any) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm: config.normalization={config.normalization!r}, expected 'RMSNorm'")
        # where megatron builds its own layers: the current GPU unless initialising on the host
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        super().__init__(hidden_size, eps=eps, device=torch.cuda.current_device() if on_gpu else None,
                         dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)

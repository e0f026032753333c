"""Core attention on torch scaled_dot_product_attention: a drop-in `core_attention` submodule."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Core attention via F.scaled_dot_product_attention ([s, b, h, d] in, [s, b, h*d] out).

    Same interface as megatron's DotProductAttention, but no [b, heads, sq, sk] score tensor is
    materialised by this module; grouped-query attention uses SDPA's `enable_gqa`. A query row
    whose keys are all masked (padding) yields zeros, where the unfused path yields a uniform mix.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"SDPAttention: context_parallel_size={config.context_parallel_size}, "
                             "expected 1 (use the Transformer Engine spec for context parallelism)")
        if config.window_size is not None:
            raise ValueError(f"SDPAttention: window_size={config.window_size} is not supported")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type={config.softmax_type!r}, expected 'vanilla'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = config.kv_channels
        self.hidden_size_per_partition = self.num_heads_per_partition * head_dim
        # apply_query_key_layer_scaling divides and re-multiplies by the layer number: net 1
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attend: query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np*hn]."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention: packed sequences need the Transformer Engine spec")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        sq, sk = query.size(0), key.size(0)
        q = query.permute(1, 2, 0, 3)                      # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)                        # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        attn_mask, is_causal = None, False
        if attention_mask is not None:
            attn_mask = ~attention_mask.bool()             # megatron: True = masked; SDPA: True = keep
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:                                          # queries are the last sq positions
                rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
                attn_mask = torch.arange(sk, device=q.device)[None, :] <= rows
        dropout_p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else nullcontext()
        with rng:                                          # dropout differs per TP rank, as upstream
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_groups_per_partition != self.num_heads_per_partition)
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return context.permute(2, 0, 1, 3).reshape(sq, query.size(1), self.hidden_size_per_partition)

"""A stand-in for Transformer Engine's modules, so that megatron-core's own TE layer spec can be
built and run on a machine without TE (or CUDA).

`fake_te_layer_spec()` calls megatron-core 0.16.1's `get_gpt_layer_with_transformer_engine_spec()`
(which decides the module tree: input_layernorm / pre_mlp_layernorm are IdentityOp, linear_qkv and
linear_fc1 are TELayerNormColumnParallelLinear, linear_proj / linear_fc2 TERowParallelLinear,
core_attention TEDotProductAttention) and replaces each TE class by a module that registers the
parameters under the names Transformer Engine gives them: LayerNormLinear's norm weight is
`layer_norm_weight` (no `layer_norm_bias` for RMSNorm) beside `weight` / `bias`, and every TE module
carries `_extra_state` (transformer_engine/pytorch/module/layernorm_linear.py, base.py). The
compute is megatron's local TP layers (RMSNorm then the linear for the fused ones), so a model
built this way gives the local spec's outputs for the same weights. `models.registry` is patched
to hand this spec out for layer_spec=transformer_engine (`use_fake_te(monkeypatch)`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from vcppo_megatron.models.attention import SDPAttention
from vcppo_megatron.models.norm import RMSNorm


class FakeTELayerNormColumnParallelLinear(ColumnParallelLinear):
    """TELayerNormColumnParallelLinear's signature and parameter names; RMSNorm + column-parallel linear."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, init_method: Any, gather_output: bool,
                 bias: bool, skip_bias_add: bool, is_expert: bool, skip_weight_param_allocation: bool = False,
                 tp_comm_buffer_name: Any = None, tp_group: Any = None, stride: int = 1) -> None:
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         stride=stride, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return super().forward(F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps), *args, **kwargs)


class FakeTERowParallelLinear(RowParallelLinear):
    """TERowParallelLinear: `weight` and `_extra_state` (megatron's local layer has both)."""


class FakeTEColumnParallelLinear(ColumnParallelLinear):
    """TEColumnParallelLinear: `weight`, `bias` and `_extra_state`."""


class FakeTEDotProductAttention(SDPAttention):
    """TEDotProductAttention: no parameters, an `_extra_state` entry."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        pass


class FakeTENorm(RMSNorm):
    """TENorm (te.pytorch.RMSNorm): `weight`, and `_extra_state` as TE >= 2 operations carry one."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        pass


def _replace(spec: Any, table: dict[int, type]) -> Any:
    """Walk a ModuleSpec tree replacing the (mocked) TE classes by their stand-ins."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        spec.module = table.get(id(spec.module), spec.module)
        if spec.submodules is not None:
            _replace(spec.submodules, table)
        return spec
    if dataclasses.is_dataclass(spec):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if id(value) in table:
                setattr(spec, f.name, table[id(value)])
            elif isinstance(value, ModuleSpec) or dataclasses.is_dataclass(value):
                _replace(value, table)
    return spec


def fake_te_layer_spec() -> tuple[Any, type]:
    """megatron-core's TE layer spec with the TE classes replaced by stand-ins; the final norm."""
    import unittest.mock

    from megatron.core import utils as mcore_utils
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs
    from packaging.version import Version

    if mcore_utils._te_version is None:          # the spec provider asks for TE's version
        mcore_utils._te_version = Version("2.8.0")
    with unittest.mock.patch.object(gpt_layer_specs, "TESpecProvider", TESpecProvider, create=True):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    table = {id(te_ext.TELayerNormColumnParallelLinear): FakeTELayerNormColumnParallelLinear,
             id(te_ext.TERowParallelLinear): FakeTERowParallelLinear,
             id(te_ext.TEColumnParallelLinear): FakeTEColumnParallelLinear,
             id(te_ext.TEDotProductAttention): FakeTEDotProductAttention}
    spec = _replace(spec, table)
    leftover = [repr(m) for m in _modules(spec) if isinstance(m, unittest.mock.Mock)]
    assert not leftover, f"TE classes without a stand-in: {leftover}"
    return spec, FakeTENorm


def _modules(spec: Any) -> list[Any]:
    """Every module class named in a spec tree."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    out = []
    if isinstance(spec, ModuleSpec):
        out.append(spec.module)
        spec = spec.submodules
    if spec is not None and dataclasses.is_dataclass(spec):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            out.extend(_modules(value) if isinstance(value, ModuleSpec) or dataclasses.is_dataclass(value)
                       else [value])
    return out


def use_fake_te(monkeypatch: Any) -> None:
    """Make models.registry build the stand-in TE spec for layer_spec=transformer_engine."""
    from vcppo_megatron.models import registry

    monkeypatch.setattr(registry, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(registry, "check_transformer_engine", lambda: None)
    monkeypatch.setattr(registry, "te_layer_spec", fake_te_layer_spec)

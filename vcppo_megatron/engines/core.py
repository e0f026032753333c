"""The shared engine core: one pipeline stage of a GPTModel + megatron DDP + distributed optimizer
+ LR scheduler + the forward/backward schedule runner, all on one role's explicit process groups.

Normalisation contract (docs/ARCHITECTURE.md, "Global loss normalisation"): `loss_fn` returns each
micro-batch's share of a globally normalised loss, so the gradient must be the SUM over
micro-batches and data-parallel ranks. The core sets `calculate_per_token_loss=True`: the schedule
then does not divide by the number of micro-batches and DDP sums over DP instead of averaging; the
per-token division that finalize_model_grads would apply is switched off (num_tokens=None).
"""
from __future__ import annotations

import abc
import contextlib
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from vcppo_megatron.checkpoint import hf_to_megatron, load_into_model, pp_stage, tp_shard
from vcppo_megatron.checkpoint.hf_weights import hf_sources, hf_to_megatron_param, layer_spec_of, spec_name
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines.batching import MicroBatch, split_micro_batches
from vcppo_megatron.engines.host_offload import OptimizerStateOffload
from vcppo_megatron.models import build_gpt_model
from vcppo_megatron.models.registry import hf_get
from vcppo_megatron.parallel.ddp import gather_params
from vcppo_megatron.parallel.groups import RoleLayout
from vcppo_megatron.parallel.launch import read_launch_env

RELEASABLE = ("grads", "optimizer")
"""What `offload` can release (the memory timeline's engine parts besides the weights)."""


def _check_parts(parts: Sequence[str]) -> list[str]:
    """The parts, checked against RELEASABLE."""
    bad = [p for p in parts if p not in RELEASABLE]
    if bad or isinstance(parts, str):
        raise ValueError(f"offload / onload parts {parts!r}: expected a sequence of {RELEASABLE}")
    return list(parts)


# (outputs of the last stage for one micro-batch, the micro-batch) -> (loss share, additive metrics)
LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
# (model output on the last stage, micro-batch) -> per-token outputs, e.g. {"values": [b, s]}
HeadFn = Callable[[Tensor, dict[str, Tensor]], dict[str, Tensor]]


def _finalize_sum(model: list, num_tokens: Optional[Tensor], pg_collection=None,
                  force_all_reduce: bool = False) -> None:
    """finalize_model_grads without the 1/num_tokens scaling: losses are already global shares."""
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def stage_layers(num_layers: int, layout: RoleLayout) -> range:
    """Global indices of the transformer layers this pipeline stage holds (even split)."""
    if num_layers % layout.pp:
        raise ValueError(f"num_hidden_layers={num_layers} must be divisible by pipeline size {layout.pp}")
    per = num_layers // layout.pp
    return range(layout.pp_rank * per, (layout.pp_rank + 1) * per)


def seed_tensor_parallel_rng(seed: int, tp_rank: int) -> None:
    """Add megatron's "model-parallel-rng" state, seeded seed + 2718 + tp_rank as
    model_parallel_cuda_manual_seed does, but from this role's TP rank rather than the global
    parallel state. TP-sharded weights initialised on the GPU, dropout, and the sequence-parallel
    embedding fork it: without it they raise "cuda rng state model-parallel-rng is not added".
    The default generator is left as it was."""
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)


def ensure_gather_buffer() -> None:
    """Sequence-parallel linear layers all-gather their input into megatron's global memory
    buffer, which initialize_model_parallel would create; the engines set up no global parallel
    state, so create that buffer (only the buffer) once per process."""
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


# parallel.recompute_activations -> TransformerConfig fields ("full": each layer's input is kept and
# the layer recomputed in the backward pass)
RECOMPUTE: dict[str, dict[str, Any]] = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def engine_device() -> torch.device:
    """The device this rank's engines live on: cuda:<LOCAL_RANK> when CUDA is available (the GPU
    `setup_device` / `init_distributed` selected; megatron allocates on the current device, so the
    two must agree), else cpu. Chosen explicitly: a model's first parameter is no guide (on a
    pipeline stage after the first it is a norm weight, built wherever the norm was built)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = read_launch_env().local_rank
    if torch.cuda.current_device() != local_rank:
        raise RuntimeError(f"current CUDA device is {torch.cuda.current_device()}, expected LOCAL_RANK "
                           f"{local_rank}: something (a rollout engine?) moved it; call "
                           f"torch.cuda.set_device({local_rank}) before building the engines")
    return torch.device("cuda", local_rank)


def place_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move every parameter and buffer of `model` to `device` (megatron builds its own layers on the
    current device, torch modules such as the norms and the value head on the host) and check."""
    model.to(device)
    stray = sorted({f"{name} on {t.device}" for name, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.device != device})
    if stray:
        raise RuntimeError(f"model tensors not on {device} after moving it: {stray[:5]}")
    return model


class EngineCore:
    """Model chunk + DDP + optimizer + scheduler + schedule runner for one role's layout."""

    def __init__(self, hf_config: Any, pgs: ProcessGroupCollection, layout: RoleLayout, *,
                 value_head: bool, optim: OptimConfig, total_steps: int = 1,
                 max_tokens_per_micro_batch: int = 4096, params_dtype: torch.dtype = torch.float32,
                 attention_backend: str = "auto", sequence_parallel: bool = False,
                 recompute_activations: str = "none", seed: int = 0, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, ddp_bucket_size: Optional[int] = None,
                 grad_reduce_in_fp32: bool = True,
                 prepare_model: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
        self.hf_config, self.pgs, self.layout = hf_config, pgs, layout
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        if sequence_parallel and layout.tp == 1:
            raise ValueError("sequence_parallel=True needs tensor parallelism (TP > 1), got TP=1")
        if overlap_param_gather and not overlap_grad_reduce:
            raise ValueError("parallel.overlap_param_gather=True needs parallel.overlap_grad_reduce=True "
                             "(megatron overlaps the gather bucket by bucket, as it reduces)")
        if recompute_activations not in RECOMPUTE:
            raise ValueError(f"recompute_activations={recompute_activations!r}, expected one of "
                             f"{sorted(RECOMPUTE)}")
        # sequence parallelism splits each micro-batch's tokens over the TP ranks: whole shares
        self.seq_multiple = layout.tp if sequence_parallel else 1
        seed_tensor_parallel_rng(seed, layout.tp_rank)
        if sequence_parallel:
            ensure_gather_buffer()
        model = build_gpt_model(
            hf_config, params_dtype=params_dtype, pre_process=layout.is_first_stage,
            post_process=layout.is_last_stage, value_head=value_head,
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            attention_backend=attention_backend, pg_collection=pgs,
            calculate_per_token_loss=True, sequence_parallel=sequence_parallel,
            **RECOMPUTE[recompute_activations],
            # micro-batches differ in shape (length-sorted, trimmed): p2p sends shapes first
            variable_seq_lengths=True,
            # no experts; megatron rejects the default "allgather" dispatcher with variable lengths
            moe_token_dispatcher_type="alltoall")
        if prepare_model is not None:       # e.g. a new output head: before DDP, which hooks every module
            prepare_model(model)
        self.config = model.config
        # the Megatron name layout of this model ('local' or 'transformer_engine'; hf_weights.py)
        self.layer_spec = layer_spec_of(model.state_dict())
        self.device = engine_device()                   # micro-batches go here; outputs come back to CPU
        self.raw_model = place_on(model, self.device)   # before DDP: its buffers take the params' device
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather, bucket_size=ddp_bucket_size,
            use_distributed_optimizer=True)
        self.model = DistributedDataParallel(self.config, self.ddp_config, model, pg_collection=pgs)
        self.config.no_sync_func = self.model.no_sync
        self.config.finalize_model_grads_func = _finalize_sum
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.grad_clip, use_distributed_optimizer=True, params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16)
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model], use_gloo_process_groups=False,
                                                pg_collection=pgs)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.lr, lr_warmup_steps=optim.lr_warmup_steps,
            lr_decay_steps=max(total_steps, optim.lr_warmup_steps + 1), lr_decay_style="constant",
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant")
        self._schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=None)
        self._p2p = P2PCommunicator(pp_group=pgs.pp, config=self.config) if layout.pp > 1 else None
        self.released: set[str] = set()
        # pinned, reused host buffers for the optimizer state (what megatron's offload_to_cpu moves)
        self.state_offload = OptimizerStateOffload(self.device)

    # ---- weights ----------------------------------------------------------------------------
    def load_megatron_state(self, full_state: dict[str, Tensor], *, tie_word_embeddings: bool) -> None:
        """Load a full (TP=1, PP=1) Megatron state dict: this rank's TP shard of its PP stage."""
        layers = stage_layers(hf_get(self.hf_config, "num_hidden_layers"), self.layout)
        groups = hf_get(self.hf_config, "num_key_value_heads") or hf_get(self.hf_config, "num_attention_heads")
        full_state = {spec_name(k, self.layer_spec): v for k, v in full_state.items()}   # either layout in
        stage = pp_stage(full_state, layers=layers, pre_process=self.layout.is_first_stage,
                         post_process=self.layout.is_last_stage, tie_word_embeddings=tie_word_embeddings)
        shards = {k: tp_shard(k, v, tp_rank=self.layout.tp_rank, tp_size=self.layout.tp,
                              num_query_groups=groups) for k, v in stage.items()}
        with torch.no_grad():
            load_into_model(self.raw_model, shards)
        self._reload_main_params()

    def load_hf_params(self, read: Callable[[str], Tensor], *, tie_word_embeddings: bool,
                       extra: Optional[dict[str, Tensor]] = None) -> None:
        """Load this rank's shards one parameter at a time: the HF tensors a parameter is built from
        come from `read(name)` (e.g. straight from safetensors), are converted, TP-sliced and copied
        in, so only one full parameter is held at a time. `extra` gives full Megatron tensors of
        parameters with no HF source (the value head)."""
        layers = list(stage_layers(hf_get(self.hf_config, "num_hidden_layers"), self.layout))
        groups = hf_get(self.hf_config, "num_key_value_heads") or hf_get(self.hf_config, "num_attention_heads")
        extra = extra or {}
        with torch.no_grad():
            for name, target in self.raw_model.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                if name in extra:
                    full = extra[name]
                else:
                    parts = name.split(".")
                    if name.startswith("decoder.layers."):           # local layer index -> global
                        parts[2] = str(layers[int(parts[2])])
                    global_name = ".".join(parts)
                    sources = [read(n) for n in hf_sources(global_name, tie_word_embeddings=tie_word_embeddings)]
                    full = hf_to_megatron_param(global_name, sources, num_query_groups=groups)
                shard = tp_shard(name, full, tp_rank=self.layout.tp_rank, tp_size=self.layout.tp,
                                 num_query_groups=groups)
                if shard.shape != target.shape:
                    raise ValueError(f"parameter {name}: HF weights give shape {tuple(shard.shape)} on this "
                                     f"rank, the model expects {tuple(target.shape)}")
                target.copy_(shard)
        self._reload_main_params()

    def load_hf_stream(self, named_tensors: Iterable[tuple[str, Tensor]], *, tie_word_embeddings: bool,
                       extra: Optional[dict[str, Tensor]] = None) -> dict[str, int]:
        """Load this rank's shards from a stream of full HF tensors (e.g. another engine's weight-sync
        buckets), consuming it to the end (its producer may hold collectives). A tensor is kept only
        while a parameter of this stage still needs it: each parameter is converted, TP-sliced and
        copied in as soon as its sources have arrived. `extra` as in `load_hf_params`. Returns
        {"max_held_bytes": most bytes of stream tensors held at once, "params": parameters loaded}."""
        layers = list(stage_layers(hf_get(self.hf_config, "num_hidden_layers"), self.layout))
        groups = hf_get(self.hf_config, "num_key_value_heads") or hf_get(self.hf_config, "num_attention_heads")
        extra = extra or {}
        targets: dict[str, tuple[str, Tensor, list[str]]] = {}  # global name -> (local name, param, sources)
        needed_by: dict[str, list[str]] = {}                       # HF name -> global Megatron names
        for name, target in self.raw_model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            if name in extra:
                self._copy_shard(name, extra[name], target, groups)
                continue
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                parts[2] = str(layers[int(parts[2])])
            global_name = ".".join(parts)
            sources = hf_sources(global_name, tie_word_embeddings=tie_word_embeddings)
            targets[global_name] = (name, target, sources)
            for source in sources:
                needed_by.setdefault(source, []).append(global_name)
        uses = {source: len(names) for source, names in needed_by.items()}   # parameters still to load
        held: dict[str, Tensor] = {}
        max_held, loaded = 0, 0
        for hf_name, tensor in named_tensors:
            if hf_name not in needed_by:
                continue                                   # another stage's (or the lm_head)
            held[hf_name] = tensor
            max_held = max(max_held, sum(t.numel() * t.element_size() for t in held.values()))
            for global_name in needed_by[hf_name]:
                name, target, sources = targets.get(global_name, (None, None, ()))
                if name is None or not all(s in held for s in sources):
                    continue
                full = hf_to_megatron_param(global_name, [held[s] for s in sources], num_query_groups=groups)
                self._copy_shard(name, full, target, groups)
                del targets[global_name], full
                loaded += 1
                for s in sources:
                    uses[s] -= 1
                    if uses[s] == 0:
                        del held[s]
        if targets:
            raise KeyError(f"the HF tensor stream lacked the sources of {sorted(targets)[:5]} "
                           f"({len(targets)} parameters in all)")
        self._reload_main_params()
        return {"max_held_bytes": max_held, "params": loaded}

    def _copy_shard(self, name: str, full: Tensor, target: Tensor, groups: int) -> None:
        """Copy this TP rank's shard of the full parameter `full` into `target`, checking the shape."""
        shard = tp_shard(name, full, tp_rank=self.layout.tp_rank, tp_size=self.layout.tp, num_query_groups=groups)
        if shard.shape != target.shape:
            raise ValueError(f"parameter {name}: the source gives shape {tuple(shard.shape)} on this rank, "
                             f"the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(shard)

    def _reload_main_params(self) -> None:
        """Copy model params into the optimizer's fp32 main params after an in-place load."""
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    def hf_full_state(self, hf_state: dict[str, Tensor], *, tie_word_embeddings: bool) -> dict[str, Tensor]:
        """HF causal-LM trunk (+ lm_head) state dict -> full Megatron state dict."""
        return hf_to_megatron(
            hf_state, num_heads=hf_get(self.hf_config, "num_attention_heads"),
            num_query_groups=hf_get(self.hf_config, "num_key_value_heads")
            or hf_get(self.hf_config, "num_attention_heads"),
            tie_word_embeddings=tie_word_embeddings)

    def main_grads(self) -> dict[str, Tensor]:
        """This stage's gradients by Megatron parameter name (views of DDP's fp32 grad buffer)."""
        return {name: p.main_grad for name, p in self.raw_model.named_parameters() if p.requires_grad}

    # ---- modes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def train_mode(self) -> Iterator[None]:
        """Model in train mode inside the block (dropout on), eval mode restored after."""
        was = self.model.training
        self.model.train()
        try:
            yield
        finally:
            self.model.train(was)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Model in eval mode and no autograd inside the block."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was)

    def zero_grad(self) -> None:
        """Zero DDP grad buffers and the optimizer's main grads."""
        if "grads" in self.released:         # zeroing a freed buffer would write through its views
            raise RuntimeError("zero_grad: the gradient buffers are offloaded; call onload() first")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def gather_params(self) -> None:
        """Make every parameter whole before it is read outside a forward pass (with
        `overlap_param_gather` the step leaves the other DP ranks' shards to the next forward)."""
        gather_params(self.model)

    def step(self) -> dict[str, float]:
        """Optimizer step (grad clip inside) and LR schedule step: grad_norm, lr, stepped."""
        if self.released:
            raise RuntimeError(f"step: {' and '.join(sorted(self.released))} offloaded; call onload() first")
        stepped, grad_norm, _ = self.optimizer.step()
        if stepped:
            self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(lr), "stepped": bool(stepped)}

    # ---- colocation memory ------------------------------------------------------------------
    def offload(self, parts: Sequence[str] = RELEASABLE) -> None:
        """Release training memory the colocated rollout engine or the other role may use.

        `grads`: the DDP gradient buffers are freed (their storage resized to 0; every view stays
        valid and is zeroed on `onload`). `optimizer`: on CUDA the optimizer's state and fp32
        master weights move to host memory (the tensors megatron-core's `offload_to_cpu` moves,
        through pinned, reused host buffers: engines/host_offload.py); with fp32 training
        weights the distributed optimizer's master weights are views of the model's, so they stay
        put, as does everything on CPU. The weights themselves always stay (memory timeline).
        """
        todo = [p for p in _check_parts(parts) if p not in self.released]
        cuda = torch.cuda.is_available()
        if "grads" in todo:
            self.model.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if "optimizer" in todo and self._offloads_optimizer_state():
            self.state_offload.offload(self.optimizer)
        self.released.update(todo)

    def onload(self, parts: Sequence[str] = RELEASABLE) -> None:
        """Bring back what `offload(parts)` released (gradients come back as zeros)."""
        todo = [p for p in _check_parts(parts) if p in self.released]
        if "optimizer" in todo and self._offloads_optimizer_state():
            self.state_offload.restore(self.optimizer)
        if "grads" in todo:
            self.model.restore_grad_buffers(synchronize=torch.cuda.is_available())
        self.released.difference_update(todo)

    def _offloads_optimizer_state(self) -> bool:
        """Optimizer state moves to host on CUDA only, and not with fp32 weights (views, see offload)."""
        return torch.cuda.is_available() and self.config.params_dtype != torch.float32

    # ---- schedule ---------------------------------------------------------------------------
    def run(self, batch: dict[str, Tensor], head_fn: HeadFn, loss_fn: Optional[LossFn],
            forward_only: bool, full_grads: bool = False, return_outputs: bool = True) -> dict[str, Any]:
        """Run the schedule over length-sorted micro-batches; return per-token outputs and metrics.

        Gradients are reduce-scattered over DP (each rank keeps its optimizer shard's part);
        `full_grads=True` all-reduces instead, so every rank's `main_grad`s hold the whole
        gradient (for inspection and tests; the optimizer step works either way).

        outputs: {name: [rows, seq] fp32 on the model's device, in the batch's row order, zero
        beyond each row's length}, broadcast from the last pipeline stage to every stage; with
        `return_outputs=False` (a training pass whose caller reads only the losses) none are kept
        and outputs is {}. metrics: summed over micro-batches (this DP rank only). The batch should
        already be on the model's device (the trainer moves it once); a micro-batch that is not
        is moved there, where loss_fn sees it.
        """
        if loss_fn is None and not forward_only:
            raise ValueError("forward_backward: loss_fn=None is only allowed with forward_only=True")
        if "grads" in self.released and not forward_only:
            raise RuntimeError("forward_backward: the gradient buffers are offloaded; call onload() first")
        micro = split_micro_batches(batch, self.max_tokens_per_micro_batch, self.seq_multiple)
        for mb in micro:                                 # no copy when already there
            mb.rows = mb.rows.to(self.device)
            mb.data = {k: v.to(self.device) for k, v in mb.data.items()}
        n, s = batch["input_ids"].shape
        collected: list[tuple[MicroBatch, dict[str, Tensor]]] = []
        metrics: dict[str, Tensor] = {}
        it = iter(micro)

        def loss_func(mb: MicroBatch, output: Tensor):
            outs = head_fn(output, mb.data)
            if return_outputs:
                collected.append((mb, {k: v.detach() for k, v in outs.items()}))
            if loss_fn is None:
                loss, m = sum(v.sum() for v in outs.values()) * 0.0, {}
            else:
                loss, m = loss_fn(outs, mb.data)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach()
            return loss, torch.ones((), dtype=torch.int), {}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb.data["input_ids"]
            pos = torch.arange(mb.seq_len, device=ids.device)[None].expand_as(ids)
            return model(ids, pos, None), partial(loss_func, mb)

        kwargs = dict(pg_collection=self.pgs)
        if self._p2p is not None:
            kwargs["p2p_communicator"] = self._p2p
        self._schedule(forward_step_func=forward_step, data_iterator=it, model=[self.model],
                       num_microbatches=len(micro), seq_length=s, micro_batch_size=1,
                       forward_only=forward_only, force_all_reduce=full_grads, **kwargs)
        outputs = self._assemble(collected, n, s) if return_outputs else {}
        return {"outputs": outputs, "metrics": metrics, "num_micro_batches": len(micro)}

    def _assemble(self, collected: list, n: int, s: int) -> dict[str, Tensor]:
        """Scatter micro-batch outputs back to [n, s] rows on the model's device; broadcast them
        from the last PP stage (over the device's backend: nccl on GPUs)."""
        names = sorted(collected[0][1]) if collected else []
        if self.layout.pp > 1:                           # stages agree on the names through one object
            box = [names]
            dist.broadcast_object_list(box, group_src=self.layout.pp - 1, group=self.pgs.pp)
            names = box[0]
        out = {k: torch.zeros(n, s, dtype=torch.float32, device=self.device) for k in names}
        for mb, outs in collected:
            w = min(mb.seq_len, s)                       # sequence-parallel padding may pass s
            for k, v in outs.items():
                out[k][mb.rows, :w] = (v.float() * mb.data["attention_mask"])[:, :w]
        if self.layout.pp > 1:
            for k in names:
                dist.broadcast(out[k], group_src=self.layout.pp - 1, group=self.pgs.pp)
        return out


class Engine(abc.ABC):
    """Public surface shared by PolicyEngine / ValueEngine: schedule, optimizer and modes of `core`.

    Subclasses set `self.core` and define `_head` (the per-token outputs handed to loss_fn).
    """

    core: EngineCore

    @abc.abstractmethod
    def _head(self, output: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model output on the last stage [b, s, ...] -> per-token outputs {name: [b, s]}."""

    def forward_backward(self, batch: dict[str, Tensor], loss_fn: Optional[LossFn],
                         forward_only: bool = False, *, full_grads: bool = False,
                         return_outputs: bool = True) -> dict[str, Any]:
        """Micro-batched forward (and backward unless forward_only); see EngineCore.run."""
        return self.core.run(batch, self._head, loss_fn, forward_only, full_grads, return_outputs)

    def step(self) -> dict[str, float]:
        """Optimizer step with grad clipping: grad_norm, lr, stepped."""
        return self.core.step()

    def zero_grad(self) -> None:
        """Zero gradient buffers."""
        self.core.zero_grad()

    def train_mode(self) -> contextlib.AbstractContextManager:
        """Train-mode context."""
        return self.core.train_mode()

    def eval_mode(self) -> contextlib.AbstractContextManager:
        """Eval-mode, no-grad context."""
        return self.core.eval_mode()

    def offload(self, parts: Sequence[str] = RELEASABLE) -> None:
        """Free gradient buffers and / or (on CUDA) move optimizer state to host (colocation)."""
        self.core.offload(parts)

    def onload(self, parts: Sequence[str] = RELEASABLE) -> None:
        """Bring back what `offload(parts)` released."""
        self.core.onload(parts)

"""Weight sync: the Megatron actor's shards (any TP / PP / DP) -> HF-named tensors in size-bounded
buckets -> every rank's vLLM engine, or an HF directory (safetensors, shard by shard).

`hf_weight_buckets` is a lazy generator run by every rank of the actor at the same time (it holds
collectives). Parameters are walked in global layer order: each TP-sharded parameter is
all-gathered over the TP group and merged (qkv per query group, fc1 = [gate; up], vocab-parallel
embedding / lm_head cut back to the HF vocabulary), renamed to HF and put into the current bucket.
With PP, the stage that owns a bucket broadcasts it over the PP group, so every rank receives the
whole model in the same order (what a rollout engine with tensor_parallel_size = 1 needs; vLLM
also accepts the full tensors at rollout TP > 1 and slices them itself, but that is not tested
here). Data-parallel replicas gather independently; nothing crosses the DP group.

Memory: the buckets already handed on are not referenced by the generator, so the extra memory
alive at any time is at most one bucket (bucket_bytes, or one larger tensor alone) plus the
gather buffer and merged copy of the tensor being converted (`SyncStats.max_transient_bytes`;
gloo's all-gather stages one more copy of its output). The consumer adds its own: vLLM's
layerwise reload holds about two copies of the layer it is loading (measured: 2 x the embedding).
A tied lm_head is never sent: vLLM and HF re-tie it to the first stage's embedding (the copy on
the last pipeline stage is skipped).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from vcppo_megatron.checkpoint.dist import unwrap_model
from vcppo_megatron.checkpoint.hf_weights import megatron_to_hf, tp_merge
from vcppo_megatron.parallel.ddp import gather_params

if TYPE_CHECKING:   # models.registry imports megatron.core; hf_get is imported where it is used
    from vcppo_megatron.models.registry import HFConfig

Bucket = list[tuple[str, Tensor]]
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
# TP split dimension of each sharded Megatron parameter (by name: Megatron sets its
# `tensor_model_parallel` attribute only when it initialises the weight itself)
_SPLIT_DIM = {"self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
              "mlp.linear_fc1.weight": 0, "embedding.word_embeddings.weight": 0,
              "output_layer.weight": 0, "self_attention.linear_proj.weight": 1,
              "mlp.linear_fc2.weight": 1}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "config.json")


@dataclass
class SyncStats:
    """What one pass of `hf_weight_buckets` moved on this rank (filled in while it runs)."""

    num_tensors: int = 0
    num_buckets: int = 0
    total_bytes: int = 0
    max_bucket_bytes: int = 0
    max_transient_bytes: int = 0
    """Largest gather buffer + merged tensor alive at once while converting one parameter."""
    seconds: float = 0.0


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of an optional process group (None: a group of one)."""
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This rank's index in an optional process group."""
    return 0 if group is None else dist.get_rank(group)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _global_params(model: torch.nn.Module, tied: bool) -> Iterator[tuple[str, Tensor]]:
    """(Megatron name with the global layer index, parameter) of one model chunk, in layer order."""
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    global_index = [layer.layer_number - 1 for layer in layers]   # layer_number is global, 1-based
    for name, param in model.named_parameters():
        if tied and name == "output_layer.weight":
            continue                      # the last stage's copy of the first stage's embedding
        match = _LOCAL_LAYER.match(name)
        if match is not None:
            name = f"decoder.layers.{global_index[int(match.group(1))]}.{match.group(2)}"
        yield name, param                 # not detached: detach() drops Megatron's TP attributes


class _Converter:
    """Full HF tensors from one rank's Megatron parameters (TP gather, merge, vocab cut, rename)."""

    def __init__(self, hf_config: HFConfig, tp_group: Optional[dist.ProcessGroup],
                 dtype: Optional[torch.dtype], stats: SyncStats) -> None:
        from vcppo_megatron.models.registry import hf_get

        self.num_heads = int(hf_get(hf_config, "num_attention_heads"))
        self.num_query_groups = int(hf_get(hf_config, "num_key_value_heads") or self.num_heads)
        self.vocab_size = int(hf_get(hf_config, "vocab_size"))
        self.tied = bool(hf_get(hf_config, "tie_word_embeddings", False))
        self.tp_group, self.tp_size = tp_group, _group_size(tp_group)
        self.dtype, self.stats = dtype, stats

    def full(self, name: str, shard: Tensor) -> Tensor:
        """The whole Megatron parameter: all-gathered over TP and merged when it is TP-sharded."""
        dim = next((d for suffix, d in _SPLIT_DIM.items() if name.endswith(suffix)), None)
        if getattr(shard, "tensor_model_parallel", False) and shard.partition_dim != dim:
            raise ValueError(f"parameter {name!r}: TP partition_dim = {shard.partition_dim}, "
                             f"expected {dim} for this name")
        shard = shard.detach()
        if self.tp_size == 1 or dim is None:
            return shard
        gathered = torch.empty((self.tp_size * shard.shape[0], *shard.shape[1:]),
                               dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(gathered, shard.contiguous(), group=self.tp_group)
        chunks = list(gathered.chunk(self.tp_size, dim=0))        # chunk r: TP rank r's shard
        if dim == 0 and not name.endswith("mlp.linear_fc1.weight"):
            full = gathered            # qkv (whole query groups per rank), vocab rows: concatenated
        else:
            full = tp_merge(name, chunks, num_query_groups=self.num_query_groups)
        transient = _nbytes(gathered) + (0 if full is gathered else _nbytes(full))
        self.stats.max_transient_bytes = max(self.stats.max_transient_bytes, transient)
        return full

    def hf_tensors(self, name: str, shard: Tensor) -> list[tuple[str, Tensor]]:
        """HF (name, contiguous tensor) pairs of one Megatron parameter shard."""
        full = self.full(name, shard)
        if name in _VOCAB_PARALLEL:
            if full.shape[0] < self.vocab_size:
                raise ValueError(f"parameter {name!r}: {full.shape[0]} vocabulary rows, expected "
                                 f">= HF vocab_size = {self.vocab_size}")
            full = full[:self.vocab_size]               # drop Megatron's vocabulary padding
        hf = megatron_to_hf({name: full}, num_heads=self.num_heads,
                            num_query_groups=self.num_query_groups, tie_word_embeddings=False)
        out = []
        for hf_name, t in hf.items():
            t = t if self.dtype is None else t.to(self.dtype)
            out.append((hf_name, t.contiguous()))
        return out


def _local_buckets(model: torch.nn.Module, conv: _Converter, bucket_bytes: int) -> Iterator[Bucket]:
    """HF tensors of one local model chunk in buckets of <= bucket_bytes (or one larger tensor)."""
    bucket: Bucket = []
    size = 0
    for name, shard in _global_params(model, conv.tied):
        for hf_name, tensor in conv.hf_tensors(name, shard):
            nbytes = _nbytes(tensor)
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((hf_name, tensor))
            size += nbytes
    if bucket:
        yield bucket


def _send_bucket(bucket: Optional[Bucket], group: dist.ProcessGroup, src: int) -> None:
    """Broadcast a bucket (names, shapes, dtypes, then tensors) from PP rank `src`; None ends it."""
    meta = None if bucket is None else [(n, tuple(t.shape), t.dtype) for n, t in bucket]
    dist.broadcast_object_list([meta], group_src=src, group=group)
    for _, tensor in bucket or []:
        dist.broadcast(tensor, group_src=src, group=group)


def _recv_bucket(group: dist.ProcessGroup, src: int, device: torch.device) -> Optional[Bucket]:
    """Receive one bucket broadcast by PP rank `src`; None after its last bucket."""
    meta: list[Any] = [None]
    dist.broadcast_object_list(meta, group_src=src, group=group)
    if meta[0] is None:
        return None
    bucket: Bucket = []
    for name, shape, dtype in meta[0]:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, group_src=src, group=group)
        bucket.append((name, tensor))
    return bucket


def hf_weight_buckets(
    model_chunks: Sequence[torch.nn.Module] | torch.nn.Module,
    hf_config: HFConfig,
    *,
    bucket_bytes: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    pp_group: Optional[dist.ProcessGroup] = None,
    dtype: Optional[torch.dtype] = None,
    stats: Optional[SyncStats] = None,
) -> Iterator[Bucket]:
    """Yield the full HF state dict of the actor in buckets of about `bucket_bytes`, on every rank.

    Every rank of the TP and PP groups must iterate it to the end together. `model_chunks` are this
    rank's (virtual pipeline) chunks, possibly DDP-wrapped; layer indices come from the layers
    themselves. `dtype` casts the tensors (e.g. to the rollout dtype). Tensors may alias the
    actor's parameters (TP = 1): consume or copy them before the next optimizer step.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes = {bucket_bytes}: expected >= 1")
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    if not chunks:
        raise ValueError("model_chunks is empty: expected this rank's model chunk(s)")
    stats = SyncStats() if stats is None else stats
    conv = _Converter(hf_config, tp_group, dtype, stats)
    pp_size, pp_rank = _group_size(pp_group), _group_rank(pp_group)
    start = time.perf_counter()
    for chunk in chunks:
        gather_params(chunk)                 # overlapped param gather: whole parameters first
    for chunk in chunks:                     # virtual stage v of all PP ranks, then v + 1, ...
        model = unwrap_model(chunk)
        device = next(model.parameters()).device
        for stage in range(pp_size):
            if stage == pp_rank:
                source: Iterable[Optional[Bucket]] = _local_buckets(model, conv, bucket_bytes)
            else:
                source = iter(lambda: _recv_bucket(pp_group, stage, device), None)  # noqa: B023
            for bucket in source:
                if pp_size > 1 and stage == pp_rank:
                    _send_bucket(bucket, pp_group, stage)
                size = sum(_nbytes(t) for _, t in bucket)
                stats.num_buckets += 1
                stats.num_tensors += len(bucket)
                stats.total_bytes += size
                stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
                yield bucket
                del bucket
            if pp_size > 1 and stage == pp_rank:
                _send_bucket(None, pp_group, stage)
    stats.seconds = time.perf_counter() - start


def iter_bucket_tensors(buckets: Iterable[Bucket]) -> Iterator[tuple[str, Tensor]]:
    """One lazy (name, tensor) stream across buckets, releasing each entry as it is handed on."""
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()


def sync_to_rollout(engine: Any, buckets: Iterable[Bucket]) -> float:
    """Load the whole bucket stream into a RolloutEngine in ONE update_weights call; seconds taken.

    One call because vLLM rebuilds fused qkv / gate_up weights from all their parts; the stream is
    lazy, so only the bucket in flight (and the layer vLLM is assembling) is held.
    """
    start = time.perf_counter()
    engine.update_weights(iter_bucket_tensors(buckets))
    return time.perf_counter() - start


def _config_json(hf_config: HFConfig) -> str:
    """config.json text of a PretrainedConfig or a config dict."""
    if hasattr(hf_config, "to_json_string"):
        return hf_config.to_json_string(use_diff=False)
    return json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n"


def export_hf_dir(
    buckets: Iterable[Bucket],
    out_dir: str | Path,
    hf_config: HFConfig,
    *,
    copy_files_from: str | Path | None = None,
    write: bool = True,
) -> list[str]:
    """Write an HF model directory, one safetensors file per bucket; returns the weight files.

    Every actor rank must call it (the buckets hold collectives); only ranks with `write=True`
    (rank 0) write. `copy_files_from` is a directory whose non-weight files (tokenizer,
    generation_config.json, ...) are copied over.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if not write:
        for _ in iter_bucket_tensors(buckets):
            pass
        return []
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _WEIGHT_FILES:                  # stale weights of an earlier export would load
        for stale in out.glob(pattern):
            stale.unlink()
    parts: list[tuple[Path, list[str]]] = []
    total = 0
    for i, bucket in enumerate(buckets):
        part = out / f"part-{i:05d}.safetensors.tmp"
        save_file(dict(bucket), str(part), metadata={"format": "pt"})
        parts.append((part, [name for name, _ in bucket]))
        total += sum(_nbytes(t) for _, t in bucket)
        bucket.clear()
    if not parts:
        raise ValueError("export_hf_dir: the buckets hold no tensors")
    weight_map: dict[str, str] = {}
    files = []
    for i, (part, names) in enumerate(parts):
        final = ("model.safetensors" if len(parts) == 1
                 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors")
        part.rename(out / final)
        files.append(final)
        weight_map.update({name: final for name in names})
    if len(parts) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(_config_json(hf_config))
    if copy_files_from is not None:
        src = Path(copy_files_from)
        if not src.is_dir():
            raise FileNotFoundError(f"copy_files_from = {str(src)!r}: expected a directory")
        for f in src.iterdir():
            if f.is_file() and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(f, out / f.name)
    return files

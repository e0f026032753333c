"""Streaming HF safetensors <-> Megatron dist checkpoint conversion (single process, CPU).

HF -> Megatron: the Megatron checkpoint is written from a TP=1/PP=1 GPTModel built on the meta
device; every tensor stays a meta placeholder until torch DCP's writer asks the planner for it
(`resolve_data`, one item at a time), when it is read from safetensors (one `safe_open` per tensor,
so no mmap stays resident) and converted. Megatron reshards on load, so the result loads into any
TP/PP layout. Megatron -> HF: a few layers at a time are loaded with partial sharded state dicts
and their bytes streamed into safetensors shards whose headers are planned from the meta shapes.
Both directions handle either layer spec's names (local / Transformer Engine, hf_weights.py): the
meta model is the local spec's, its checkpoint keys renamed. Peak host memory therefore follows the
largest tensor / a few layers, not the model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from vcppo_megatron.checkpoint import dist as ckpt
from vcppo_megatron.checkpoint.hf_weights import (
    LAYER_SPECS,
    hf_sources,
    hf_to_megatron_param,
    layer_spec_of,
    megatron_to_hf,
    spec_name,
)
from vcppo_megatron.models.registry import SUPPORTED_ARCHITECTURES, _check_supported, hf_get

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                   ".msgpack", ".h5")
HF_SUBDIR = "hf"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class ConversionError(ValueError):
    """Bad conversion input: missing file or tensor, unsupported architecture, shape mismatch."""


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of an HF model directory, checked for a supported architecture."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: config.json is missing (expected an HF model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    try:
        _check_supported(config)
    except ValueError as e:
        raise ConversionError(f"{path}: {e} (SUPPORTED_ARCHITECTURES={SUPPORTED_ARCHITECTURES})") from None
    return config


class SafetensorsIndex:
    """Name -> file of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = hf_dir
        index, single = hf_dir / "model.safetensors.index.json", hf_dir / "model.safetensors"
        if index.is_file():
            self.files = {k: hf_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        for path in set(self.files.values()):
            if not path.is_file():
                raise ConversionError(f"{path}: listed in model.safetensors.index.json but missing")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in set(self.files.values()):
            self._meta.update(_read_header(path))

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` from the file header."""
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """torch dtype of tensor `name`."""
        return _ST_TO_TORCH[self._meta[name][1]]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (the file is opened and closed around it: nothing stays mapped)."""
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype code) from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A 1-rank gloo group and TP=PP=1 parallel_state when none exist (the converters run alone)."""
    from megatron.core import parallel_state as ps

    from vcppo_megatron.platform import setup_device

    setup_device()
    own_dist = not dist.is_initialized()
    if own_dist:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"conversion runs on one process, found world_size={dist.get_world_size()}")
    own_ps = not ps.model_parallel_is_initialized()
    if own_ps:
        ps.initialize_model_parallel()
    try:
        yield
    finally:
        if own_ps:
            ps.destroy_model_parallel()
        if own_dist:
            dist.destroy_process_group()


def _meta_model(hf_config: Mapping[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """TP=1/PP=1 GPTModel whose parameters are meta tensors (no memory, no init)."""
    from vcppo_megatron.models import build_gpt_model

    with torch.device("meta"):
        model = build_gpt_model(dict(hf_config), params_dtype=dtype, attention_backend="sdpa",
                                perform_initialization=False)
    return model.to(dtype)                      # norms too (Megatron builds them in fp32): one dtype


def _sharded_sd(model: torch.nn.Module, keep_objects: bool = False) -> dict[str, Any]:
    """The TP=1/PP=1 model's sharded state dict; the `_extra_state` objects only if `keep_objects`."""
    from megatron.core import parallel_state as ps

    sd = model.sharded_state_dict(metadata={"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)})
    return {k: v for k, v in sd.items() if keep_objects or not isinstance(v, ShardedObject)}


def _heads(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """num_heads / num_query_groups / tie flag for the hf_weights functions."""
    heads = hf_config["num_attention_heads"]
    return dict(num_heads=heads, num_query_groups=hf_get(hf_config, "num_key_value_heads") or heads,
                tie_word_embeddings=bool(hf_get(hf_config, "tie_word_embeddings", False)))


def _check_hf_tensors(index: SafetensorsIndex, meta_state: Mapping[str, torch.Tensor],
                      hf_config: Mapping[str, Any]) -> None:
    """Every expected HF tensor is present with the shape config.json implies; name what is not."""
    expected = megatron_to_hf(meta_state, **_heads(hf_config))
    if _heads(hf_config)["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    for name, t in expected.items():
        if name not in index.files:
            raise ConversionError(f"{index.dir}: tensor {name!r} is missing from the safetensors files")
        if index.shape(name) != tuple(t.shape):
            raise ConversionError(f"{index.files[name]}: tensor {name!r} has shape {list(index.shape(name))}, "
                                  f"expected {list(t.shape)} from config.json")
    extra = sorted(n for n in index.files if n not in expected and not n.endswith("rotary_emb.inv_freq")
                   and not (n == "lm_head.weight" and _heads(hf_config)["tie_word_embeddings"]))
    if extra:
        raise ConversionError(f"{index.dir}: tensors with no Megatron mapping: {extra[:10]}")


class _LazyPlanner(MCoreSavePlanner):
    """MCoreSavePlanner that materialises meta placeholders only when the writer asks for them."""

    def __init__(self, materialise: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.materialise = materialise

    def resolve_data(self, write_item: Any) -> Any:
        """The item's tensor, read and converted now if it is a meta placeholder."""
        data = super().resolve_data(write_item)
        if isinstance(data, torch.Tensor) and data.is_meta:
            chunk = write_item.tensor_data.chunk
            data = self.materialise(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))
        return data


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save through torch's FileSystemWriter, which resolves and writes items one by one."""

    def __init__(self, materialise: Any) -> None:
        super().__init__("torch_dist", 1, thread_count=1)
        self.materialise = materialise

    def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
        """Write the state dict with bounded memory (no up-front staging of all tensors)."""
        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_sd = mcore_to_pyt_state_dict(sd, False)
        dcp_save(pyt_sd, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=_LazyPlanner(self.materialise, dedup_replicated_tensors=False,
                                      flatten_state_dict=False))


def copy_hf_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (every non-weight top-level file)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def _in_layout(sd: dict[str, Any], layer_spec: str) -> dict[str, Any]:
    """A TP=1/PP=1 local-spec sharded state dict with its checkpoint keys in `layer_spec`'s names.

    For Transformer Engine the two per-layer norms move into the linears after them, and the
    `_extra_state` objects that TE modules have and local ones do not (core attention, final norm;
    hf_weights.py) are added, holding None as the local layers' do (TE's set_extra_state ignores
    None). A TE version whose model does not ask for one of them ignores it on load."""
    if layer_spec == "local":
        return sd
    out: dict[str, Any] = {}
    for name, item in sd.items():
        item.key = spec_name(item.key, layer_spec)
        out[name] = item
        if isinstance(item, ShardedObject) and item.key.endswith("self_attention.linear_proj._extra_state"):
            extra = name.replace("linear_proj._extra_state", "core_attention._extra_state")
            out[extra] = dataclasses.replace(item, key=item.key.replace("linear_proj", "core_attention"))
    # not a layer: one replicated object (converting runs on one rank: replica (0, 0, 0))
    out["decoder.final_layernorm._extra_state"] = ShardedObject(
        "decoder.final_layernorm._extra_state", None, (1,), (0,), (0, 0, 0))
    return out


def convert_hf_to_megatron(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           layer_spec: str = "local", progress: bool = True) -> Path:
    """HF safetensors model directory -> Megatron dist checkpoint root `out_dir` (step 0); returns the step dir.

    `layer_spec` ('local' / 'transformer_engine') is the name layout written: that of the model
    the checkpoint will be loaded into."""
    if layer_spec not in LAYER_SPECS:
        raise ConversionError(f"layer_spec={layer_spec!r}, expected one of {LAYER_SPECS}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    index = SafetensorsIndex(hf_dir)
    dtype = index.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in index.files \
        else torch.float32
    heads = _heads(hf_config)
    with single_process_megatron():
        model = _meta_model(hf_config, dtype)
        meta_state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        _check_hf_tensors(index, meta_state, hf_config)
        sd = _in_layout(_sharded_sd(model, keep_objects=True), layer_spec)
        where: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
        for name, item in sd.items():
            if isinstance(item, ShardedObject):
                continue
            shards = item.build() if isinstance(item, ShardedTensorFactory) else [item]
            shards = shards if isinstance(shards, list) else [shards]
            for st in shards:
                where[(st.key, tuple(st.global_offset))] = (name, st.prepend_axis_num)
        bar = tqdm(total=len(where), desc="HF -> Megatron", unit="tensor", disable=not progress)

        def materialise(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
            name, prepend = where[(key, offsets)]
            full = hf_to_megatron_param(name, [index.get(n) for n in hf_sources(
                name, tie_word_embeddings=heads["tie_word_embeddings"])],
                num_query_groups=heads["num_query_groups"])
            part = full[tuple(slice(o, o + s) for o, s in zip(offsets[prepend:], sizes[prepend:]))]
            bar.update(1)
            return part.to(dtype).contiguous().reshape(sizes)

        root_tmp = out_dir / ".tmp.convert"
        step_tmp = root_tmp / ckpt.step_dir_name(0)
        shutil.rmtree(root_tmp, ignore_errors=True)
        step_tmp.mkdir(parents=True)
        dist_checkpointing.save(sd, str(step_tmp), sharded_strategy=_StreamingSaveStrategy(materialise))
        bar.close()
        copy_hf_files(hf_dir, step_tmp / HF_SUBDIR)
        meta = {"format_version": ckpt.FORMAT_VERSION, "step": 0, "layout": {"tp": 1, "pp": 1, "dp": 1,
                                                                                "world_size": 1},
                "model_config": hf_config, "dtype": str(dtype).removeprefix("torch."),
                "contents": {"model": True, "optimizer": False, "optimizer_sharding": None,
                             "scheduler": False, "rng": False}, "scheduler": None,
                "converted_from": str(hf_dir), "layer_spec": layer_spec}
        ckpt._write_json(step_tmp / ckpt.META_FILE, meta)
        ckpt._write_json(step_tmp / ckpt.TRAINING_STATE_FILE, {})
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / ckpt.step_dir_name(0)
    if final.exists():
        shutil.rmtree(final)
    os.replace(step_tmp, final)
    shutil.rmtree(root_tmp)
    ckpt.write_latest(out_dir, final.name)
    return final


class _SafetensorsShardWriter:
    """Writes safetensors shards whose headers are planned up front; tensors arrive in plan order."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _numel(item[1]) * item[2].itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(item)
            size += nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out_dir, self.order = out_dir, [name for shard in self.shards for name, _, _ in shard]
        self.pos, self.file, self.shard_idx, self.total = 0, None, -1, sum(
            _numel(s) * d.itemsize for _, s, d in plan)

    def _open_next(self) -> None:
        """Close the current shard and start the next with its full header."""
        if self.file is not None:
            self.file.close()
        self.shard_idx += 1
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[self.shard_idx]:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.out_dir / self.names[self.shard_idx], "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.left = len(self.shards[self.shard_idx])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor."""
        expected = self.order[self.pos]
        if name != expected:
            raise RuntimeError(f"tensor {name!r} arrived out of plan order, expected {expected!r}")
        if self.file is None or self.left == 0:
            self._open_next()
        _, shape, dtype = self.shards[self.shard_idx][len(self.shards[self.shard_idx]) - self.left]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"tensor {name!r}: found shape {list(tensor.shape)} {tensor.dtype}, "
                                  f"expected {list(shape)} {dtype}")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)   # no bytes copy
        self.pos += 1
        self.left -= 1

    def close(self) -> None:
        """Finish the last shard and write the index for a sharded checkpoint."""
        if self.file is not None:
            self.file.close()
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
            ckpt._write_json(self.out_dir / "model.safetensors.index.json",
                             {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def _numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape."""
    n = 1
    for s in shape:
        n *= s
    return n


def _request(key: str, global_shape: tuple[int, ...], shape: tuple[int, ...], layer: Optional[int],
             dtype: torch.dtype) -> ShardedTensor:
    """A ShardedTensor asking for one whole parameter (one layer's slice of a layer-stacked key).

    Built without prepend axes so Megatron loads it as an irregular shard: only these bytes are read."""
    local = (1, *shape) if layer is not None else tuple(shape)
    if tuple(global_shape[-len(shape):]) != tuple(shape) or len(global_shape) != len(local):
        raise ckpt.CheckpointError(f"checkpoint tensor {key!r} has global shape {list(global_shape)}, "
                                   f"expected {[global_shape[0], *shape] if layer is not None else list(shape)}")
    offset = (layer, *([0] * len(shape))) if layer is not None else (0,) * len(shape)
    return ShardedTensor(key=key, data=torch.empty(local, dtype=dtype), dtype=dtype, local_shape=local,
                         global_shape=tuple(global_shape), global_offset=offset,
                         axis_fragmentations=tuple(g // l for g, l in zip(global_shape, local)))


def _layer_of(name: str) -> Optional[int]:
    """Layer index of a Megatron state-dict name, None for embedding / final norm / output layer."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("decoder.layers.") else None


def _chunks(names: list[str], num_layers: int, layers_per_load: int) -> list[list[str]]:
    """State-dict names per load: `layers_per_load` layers each; embedding first, final norm/head last."""
    if layers_per_load < 1:
        raise ValueError(f"layers_per_load={layers_per_load}, expected >= 1")
    starts = range(0, num_layers, layers_per_load)
    chunks = [[n for n in names if _layer_of(n) is not None and a <= _layer_of(n) < a + layers_per_load]
              for a in starts]
    chunks[0] = [n for n in names if n.startswith("embedding.")] + chunks[0]
    chunks[-1] += [n for n in names if _layer_of(n) is None and not n.startswith("embedding.")]
    return chunks


def convert_megatron_to_hf(megatron_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           hf_files_dir: str | os.PathLike | None = None, layers_per_load: int = 2,
                           max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> Path:
    """Megatron dist checkpoint (root or step dir; any TP/PP it was saved at) -> HF safetensors directory."""
    step_dir = ckpt.resolve_checkpoint_dir(megatron_dir)
    meta = ckpt.read_checkpoint_meta(step_dir)
    files_dir = Path(hf_files_dir) if hf_files_dir is not None else step_dir / HF_SUBDIR
    if (files_dir / "config.json").is_file():
        hf_config = read_hf_config(files_dir)
    elif meta["model_config"] is not None:
        hf_config = dict(meta["model_config"])
        _check_supported(hf_config)
    else:
        raise ConversionError(f"checkpoint {step_dir}: no {files_dir / 'config.json'} and no model_config "
                              f"recorded; pass hf_files_dir with the model's config.json")
    heads = _heads(hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with single_process_megatron():
        tensors_meta = dist_checkpointing.load_tensors_metadata(str(step_dir))
        dtype = tensors_meta["embedding.word_embeddings.weight"].dtype
        model = _meta_model(hf_config, dtype)
        names = [k for k in model.state_dict() if not k.endswith("_extra_state")]
        chunk_names = _chunks(names, hf_config["num_hidden_layers"], layers_per_load)
        meta_state = model.state_dict()
        layout = layer_spec_of(tensors_meta)      # the layer spec the checkpoint was written with
        # state-dict name (local spec) -> checkpoint key (the checkpoint's layout)
        keys = {n: spec_name(item.key, layout) for n, item in _sharded_sd(model).items()}
        missing = sorted(keys[n] for n in names if keys[n] not in tensors_meta)
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {step_dir}: tensors missing for a {hf_config['model_type']} "
                                       f"model of this config: {missing[:10]}")
        plan = []
        for cn in chunk_names:
            hf_meta = megatron_to_hf({n: meta_state[n] for n in cn}, **{**heads, "tie_word_embeddings": False})
            plan += [(k, tuple(v.shape), v.dtype) for k, v in hf_meta.items()]
        writer = _SafetensorsShardWriter(out_dir, plan, max_shard_bytes)
        strategy = get_default_load_sharded_strategy(str(step_dir))
        for cn in tqdm(chunk_names, desc="Megatron -> HF", unit="chunk", disable=not progress):
            sd = {n: _request(keys[n], tensors_meta[keys[n]].global_shape, meta_state[n].shape, _layer_of(n), dtype)
                  for n in cn}
            try:
                loaded = dist_checkpointing.load(sd, str(step_dir), sharded_strategy=strategy,
                                                 validate_access_integrity=False)
            except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint path
                raise ckpt.CheckpointError(f"checkpoint {step_dir}: loading {sorted(cn)[:3]}... failed: "
                                           f"{type(e).__name__}: {e}") from e
            loaded = {n: loaded[n].reshape(meta_state[n].shape).to(dtype) for n in cn}        # HF output: one dtype, the embedding's
            for k, v in megatron_to_hf(loaded, **{**heads, "tie_word_embeddings": False}).items():
                writer.write(k, v)
        writer.close()
    if files_dir.is_dir():
        copy_hf_files(files_dir, out_dir)
    if not (out_dir / "config.json").is_file():
        ckpt._write_json(out_dir / "config.json", hf_config)
    return out_dir

"""Distributed training checkpoints on Megatron-Core dist_checkpointing (torch_dist format).

One checkpoint is a directory `<root>/step_<step:08d>/` holding
- the dist checkpoint of the model (GPTModel.sharded_state_dict) and, optionally, of the
  DistributedOptimizer (`dp_reshardable` or `fully_reshardable` sharding): `metadata.json`,
  `common.pt`, `*.distcp`, `.metadata`;
- `vcppo_checkpoint.json`: format version, step, parallel layout (tp/pp/dp/world size), model config,
  what is inside, the LR schedule (OptimizerParamScheduler.state_dict());
- `training_state.json`: the trainer's extra state (step, data position, ...);
- `rng/rank_<rank:05d>.pt`: python, numpy, torch CPU, CUDA and Megatron RNG-tracker states per rank.
`<root>/latest` names the newest complete step directory. A checkpoint is written into a hidden
temporary directory and renamed when complete, so a crash never leaves a half checkpoint behind
`latest`.

Resharding: model weights load into any TP/PP/DP layout (Megatron reshards ShardedTensors).
Optimizer state saved `fully_reshardable` loads into any TP/PP/DP layout too (tested: TP=2 to
PP=2 and DP=2, training continues as uninterrupted); saved `dp_reshardable` (the default: fully
parallel, no communication) it loads only into the same TP and PP sizes, and a TP/PP change with
that optimizer state requested raises CheckpointError. RNG states are restored only into the
identical layout (same world size, TP, PP); pass `load_rng=False` otherwise.

Notes on Megatron-Core 0.16.1 without global parallel state: MegatronModule.sharded_state_dict
falls back to parallel_state's TP group for modules that carry no `tp_group`, and the last
pipeline stage of a tied-embedding model reads parallel_state's DP rank; `model_sharded_state_dict`
passes `pg_collection`'s groups instead. Its `fully_reshardable` load fails with torch's Adam
(KeyError 'step'); `_load_fully_reshardable` works around that.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import types
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
from megatron.core.process_groups_config import ProcessGroupCollection

from vcppo_megatron.parallel.ddp import gather_params

FORMAT_VERSION = 1
META_FILE = "vcppo_checkpoint.json"
TRAINING_STATE_FILE = "training_state.json"
LATEST_FILE = "latest"
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible with the requested load."""


class CheckpointReadError(CheckpointError):
    """A checkpoint's files cannot be read (missing, truncated or corrupt), as opposed to one that
    reads fine but does not fit the requested load; the message names the step directory and file."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of `step`."""
    return f"step_{step:08d}"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layout_of(pg_collection: ProcessGroupCollection) -> dict[str, int]:
    """The parallel layout recorded in a checkpoint: tp, pp, dp sizes and the world size."""
    return {"tp": pg_collection.tp.size(), "pp": pg_collection.pp.size(), "dp": pg_collection.dp.size(),
            "world_size": dist.get_world_size()}


def model_sharded_state_dict(model: torch.nn.Module, pg_collection: ProcessGroupCollection) -> dict:
    """GPTModel.sharded_state_dict with the TP and DP x CP groups passed explicitly (parameters
    gathered first when DDP overlaps the gather: a save must not see stale shards)."""
    from megatron.core.transformer.module import MegatronModule

    gather_params(model)
    model = unwrap_model(model)
    for module in model.modules():
        if isinstance(module, MegatronModule) and not hasattr(module, "tp_group"):
            module.tp_group = pg_collection.tp
    if getattr(model, "share_embeddings_and_output_weights", False) and model.post_process \
            and not getattr(model, "mtp_process", False) \
            and not model.pre_process:
        model.tie_embeddings_and_output_weights_state_dict = types.MethodType(_tie_output_to_embedding, model)
    return model.sharded_state_dict(metadata={"dp_cp_group": pg_collection.dp_cp})


def _tie_output_to_embedding(model: Any, sharded_state_dict: dict, output_layer_weight_key: str,
                             first_stage_word_emb_key: str, metadata: Mapping[str, Any]) -> None:
    """LanguageModule.tie_embeddings_and_output_weights_state_dict for the last of several stages
    (tied embeddings), with the DP x CP rank from `metadata` instead of parallel_state.

    Megatron-Core 0.16.1 reads `parallel_state.get_data_parallel_rank` there, which fails when the
    groups are passed explicitly (no global parallel state). As there: the last stage's output
    weight is saved as a replica (1, 0, dp_cp rank) of the first stage's word embeddings.
    """
    from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

    del sharded_state_dict[output_layer_weight_key]
    sharded_state_dict[output_layer_weight_key] = make_tp_sharded_tensor_for_checkpoint(
        tensor=model.shared_embedding_or_output_weight(), key=first_stage_word_emb_key,
        replica_id=(1, 0, metadata["dp_cp_group"].rank()), allow_shape_mismatch=True,
        tp_group=model.tp_group, dp_cp_group=metadata["dp_cp_group"])


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (if present), Megatron's tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states written by _rng_state."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["tracker"]:              # older checkpoints hold none: keep the engines' seeded states
        get_cuda_rng_tracker().set_states(state["tracker"])


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_latest(root: Path, name: str) -> None:
    """Point `<root>/latest` at `name`, atomically."""
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    pg_collection: ProcessGroupCollection,
    optimizer: Any = None,
    scheduler: Any = None,
    training_state: Optional[Mapping[str, Any]] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    optimizer_format: str = "dp_reshardable",
) -> Path:
    """Save model (+ optimizer, LR schedule, RNG, training state) as `<root>/step_<step>`; collective.

    optimizer_format: `dp_reshardable` (each rank writes its own shard, no communication; loads
    at the same TP / PP only) or `fully_reshardable` (loads at any TP / PP / DP; the save gathers
    each model shard's optimizer state over its DP group, 12 bytes per parameter of the shard).
    """
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format = {optimizer_format!r}: expected one of {OPTIMIZER_FORMATS}")
    sharding = {"distrib_optim_sharding_type": optimizer_format}
    root = Path(root)
    rank = dist.get_rank()
    final, tmp = root / step_dir_name(step), root / f".tmp.{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd = model_sharded_state_dict(model, pg_collection)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=dict(sharding))
    dist_checkpointing.save(state, str(tmp), sharded_strategy=("torch_dist", 1))
    (tmp / "rng").mkdir(exist_ok=True)        # after the save: dist_checkpointing wants an empty dir
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "layout": layout_of(pg_collection),
                "model_config": json.loads(json.dumps(dict(model_config))) if model_config is not None else None,
                "contents": {"model": True, "optimizer": optimizer is not None,
                             "optimizer_sharding": sharding if optimizer is not None else None,
                             "scheduler": scheduler is not None, "rng": True},
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
        _write_json(tmp / META_FILE, meta)
        _write_json(tmp / TRAINING_STATE_FILE, dict(training_state or {}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, final.name)
    dist.barrier()
    return final


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A step directory from a checkpoint root (via `latest`) or a step directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: does not exist")
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(f"checkpoint {path}: not a checkpoint, expected a '{LATEST_FILE}' file "
                              f"(checkpoint root) or '{META_FILE}' (step directory)")
    step_dir = path / latest.read_text().strip()
    if not (step_dir / META_FILE).is_file():
        raise CheckpointError(f"checkpoint {path}: '{LATEST_FILE}' names {step_dir.name!r}, "
                              f"but {step_dir / META_FILE} does not exist")
    return step_dir


def read_checkpoint_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed vcppo_checkpoint.json of a step directory, validated."""
    step_dir = Path(step_dir)
    meta_path = step_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointReadError(f"checkpoint {step_dir}: {META_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"checkpoint {step_dir}: {META_FILE} is corrupt ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {step_dir}: format_version={meta.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    for name in ("metadata.json", ".metadata"):
        if not (step_dir / name).is_file():
            raise CheckpointReadError(f"checkpoint {step_dir}: dist checkpoint file {name!r} is missing "
                                      f"(incomplete or corrupt checkpoint)")
    return meta


def verify_checkpoint_files(step_dir: str | os.PathLike) -> None:
    """Check, without loading tensors, that every file of a step directory is there and long enough.

    Reads the dist checkpoint's `.metadata` (where each tensor lies: file, offset, length) and compares
    with the files' sizes; raises CheckpointReadError naming the step directory and the first bad file.
    Catches a truncated or missing shard (an interrupted copy, a full disk) before a collective load.
    """
    from torch.distributed.checkpoint import FileSystemReader

    step_dir = Path(step_dir)
    meta = read_checkpoint_meta(step_dir)
    try:
        storage = FileSystemReader(str(step_dir)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - any failure to parse it means the file is unreadable
        raise CheckpointReadError(f"checkpoint {step_dir}: file '.metadata' cannot be read "
                                  f"({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = step_dir / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"truncated: {size} bytes, its tensors end at byte {end}"
            raise CheckpointReadError(f"checkpoint {step_dir}: file {name!r} is {found}")
    files = ["common.pt", TRAINING_STATE_FILE]
    if meta["contents"].get("rng"):
        files += [f"rng/rank_{r:05d}.pt" for r in range(meta["layout"]["world_size"])]
    for name in files:
        if not (step_dir / name).is_file() or (step_dir / name).stat().st_size == 0:
            raise CheckpointReadError(f"checkpoint {step_dir}: file {name!r} is missing or empty")


def _check_compatible(step_dir: Path, meta: Mapping[str, Any], layout: Mapping[str, int], *,
                      optimizer: bool, scheduler: bool, load_rng: bool,
                      model_config: Optional[Mapping[str, Any]]) -> None:
    """Raise CheckpointError when the requested load does not fit the saved checkpoint."""
    saved, contents = meta["layout"], meta["contents"]
    for what, wanted in (("optimizer", optimizer), ("scheduler", scheduler), ("rng", load_rng)):
        if wanted and not contents[what]:
            raise CheckpointError(f"checkpoint {step_dir}: has no {what} state (saved contents: {contents}); "
                                  f"load without it")
    sharding = (contents.get("optimizer_sharding") or {}).get("distrib_optim_sharding_type")
    if optimizer and sharding != "fully_reshardable" and (saved["tp"], saved["pp"]) != (layout["tp"], layout["pp"]):
        raise CheckpointError(
            f"checkpoint {step_dir}: optimizer state saved at tp={saved['tp']}, pp={saved['pp']} cannot load "
            f"at tp={layout['tp']}, pp={layout['pp']} (saved dp_reshardable, which supports DP changes only; "
            f"to change TP / PP, save with optimizer_format='fully_reshardable', in the trainer "
            f"trainer.checkpoint_optimizer_format=fully_reshardable); load the model weights alone "
            f"(optimizer=None)")
    same = all(saved[k] == layout[k] for k in ("tp", "pp", "world_size"))
    if load_rng and not same:
        raise CheckpointError(f"checkpoint {step_dir}: RNG states saved at layout {saved} cannot be restored "
                              f"at layout {dict(layout)}; pass load_rng=False")
    if model_config is not None and meta["model_config"] is not None:
        model_config = json.loads(json.dumps(dict(model_config)))      # as saved: JSON keys are strings
        diff = {k: (meta["model_config"].get(k), v) for k, v in model_config.items()
                if k in meta["model_config"] and meta["model_config"][k] != v}
        if diff:
            raise CheckpointError(f"checkpoint {step_dir}: model config differs, field: (saved, given) = {diff}")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    pg_collection: ProcessGroupCollection,
    optimizer: Any = None,
    scheduler: Any = None,
    load_rng: bool = True,
    model_config: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Load a checkpoint (root or step dir) into model [, optimizer, scheduler, RNG]; returns the training state.

    Collective. A freshly built DistributedOptimizer is fine: its states are initialised before loading.
    """
    step_dir = resolve_checkpoint_dir(path)
    meta = read_checkpoint_meta(step_dir)
    layout = layout_of(pg_collection)
    _check_compatible(step_dir, meta, layout, optimizer=optimizer is not None, scheduler=scheduler is not None,
                      load_rng=load_rng, model_config=model_config)
    if optimizer is not None:
        _init_optimizer_states(optimizer)       # before the model load: the dummy step touches params
    model_sd = model_sharded_state_dict(model, pg_collection)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                          metadata=dict(meta["contents"]["optimizer_sharding"]))
    verify_checkpoint_files(step_dir)
    try:
        loaded = dist_checkpointing.load(state, str(step_dir),
                                         sharded_strategy=get_default_load_sharded_strategy(str(step_dir)))
    except CheckpointingException as e:             # megatron's validation: the checkpoint does not fit
        raise CheckpointError(f"checkpoint {step_dir}: loading failed: {type(e).__name__}: {e}") from e
    except (Exception, DcpCheckpointException) as e:  # noqa: BLE001 - torch's read errors are BaseExceptions
        raise CheckpointReadError(f"checkpoint {step_dir}: a file cannot be read: {_read_failure(e)}") from e
    missing, _ = unwrap_model(model).load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {step_dir}: model parameters not loaded: {missing}")
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of leaf params; Megatron copies into them in place
            if meta["contents"]["optimizer_sharding"]["distrib_optim_sharding_type"] == "fully_reshardable":
                _load_fully_reshardable(optimizer, loaded["optimizer"])
            else:
                optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if load_rng:
        rng_file = step_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if not rng_file.is_file():
            raise CheckpointReadError(f"checkpoint {step_dir}: RNG state file {rng_file.name} is missing")
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, zip errors: all unreadable
            raise CheckpointReadError(f"checkpoint {step_dir}: file 'rng/{rng_file.name}' cannot be read "
                                      f"({type(e).__name__}: {e})") from None
        _set_rng_state(rng)
    return read_training_state(step_dir)


def read_training_state(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The trainer's state saved with a checkpoint (training_state.json)."""
    step_dir = Path(step_dir)
    try:
        return json.loads((step_dir / TRAINING_STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"checkpoint {step_dir}: file {TRAINING_STATE_FILE!r} is missing or corrupt "
                                  f"({e})") from None


def _read_failure(e: BaseException) -> str:
    """One line for a dist_checkpointing read failure; torch's CheckpointException wraps each rank's."""
    failures = getattr(e, "failures", None)      # {rank: (exception, traceback summary)}
    if failures:
        excs = {rank: exc[0] if isinstance(exc, tuple) else exc for rank, exc in failures.items()}
        inner = [f"rank {rank}: {type(exc).__name__}: {exc}".rstrip(": ") for rank, exc in sorted(excs.items())]
        return "; ".join(inner[:4]) + (f" (and {len(inner) - 4} more ranks)" if len(inner) > 4 else "")
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _init_optimizer_states(optimizer: Any) -> None:
    """Give every (chained) DistributedOptimizer its Adam states so loading can fill them in place."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_fully_reshardable(optimizer: Any, state: Any) -> None:
    """Load a `fully_reshardable` optimizer state (saved at any TP / PP / DP layout).

    Megatron-Core 0.16.1's DistributedOptimizer.load_state_dict fails on it with torch Adam (no
    Apex / TE): it adds the per-parameter `step` to each state, then copies every state key from
    the checkpoint's model-space tensors, which hold only param / exp_avg / exp_avg_sq (KeyError
    'step'). So: the common part first (param groups, step), then the parameter state with the
    step set aside; `_unshare_adam_steps` gives every parameter the loaded step afterwards.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(chained) == 1 else [v for _, v in sorted(state.items())]
    for opt, part in zip(chained, parts):
        part = dict(part)
        param_state = part.pop("param_state")
        part.pop("param_state_sharding_type", None)
        opt.load_state_dict(part)
        aside = [(st, st.pop("step")) for st in opt.optimizer.state.values() if "step" in st]
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for st, step in aside:
                st["step"] = step


def _unshare_adam_steps(optimizer: Any) -> None:
    """Set each parameter's Adam `step` to the loaded step, as its own tensor.

    Megatron-Core 0.16.1's DistributedOptimizer.load_state_dict (torch-optimizer path, no Apex/TE)
    writes the checkpoint's step into the param groups, but (a) when the states already exist (a
    fresh optimizer initialised with dummy values) the per-parameter `step` stays at the dummy 1,
    and (b) otherwise ONE step tensor is shared by every parameter and torch Adam increments it in
    place once per parameter. Either way the bias correction of later updates is wrong.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)

"""Distributed checkpoints on 2 gloo ranks, all checks in one spawn:
1. an HF checkpoint converted by convert_hf_to_megatron loads at TP=2 and PP=2 with logits equal HF's;
2. a checkpoint saved at TP=2 loads at PP=2 and at TP=1 (DP=2) with logits equal the TP=2 model's;
3. training (DDP + distributed optimizer + LR schedule) resumed from a step-k checkpoint continues
   exactly like the uninterrupted run;
4. incompatible loads raise CheckpointError; the TP=2 checkpoint converts back to the original HF tensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_gloo
from model_fixtures import VOCAB, tiny_batch, tiny_hf_model

HF_TOL, RESHARD_TOL, RESUME_TOL = 1e-4, 1e-5, 1e-6
MODELS = ("qwen2_tied", "llama3")
TOTAL_STEPS, SAVE_AT = 5, 2


def _setup(tp: int, pp: int, hf_config, seed: int = 0, parallel_output: bool = False):
    """parallel_state at (tp, pp), a model for this rank's stage and its ProcessGroupCollection."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vcppo_megatron.models import build_gpt_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    stage = pgc.pp.rank()
    model = build_gpt_model(hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            pre_process=stage == 0, post_process=stage == pp - 1, attention_backend="sdpa",
                            parallel_output=parallel_output, pg_collection=pgc)
    return model, pgc


def _logits(model, pgc, hidden_size: int):
    """Full logits on the last pipeline stage (PP=1 or 2, hidden states sent stage 0 -> 1), else None."""
    ids, pos = tiny_batch()
    with torch.no_grad():
        if pgc.pp.size() == 1:
            return model(ids, pos, None)
        if pgc.pp.rank() == 0:
            dist.send(model(ids, pos, None).contiguous(), group_dst=1, group=pgc.pp)
            return None
        hidden = torch.empty(ids.shape[1], ids.shape[0], hidden_size)
        dist.recv(hidden, group_src=0, group=pgc.pp)
        model.set_input_tensor(hidden)
        return model(ids, pos, None)


def _load_logits(tp: int, pp: int, ckpt_dir: str, hf_config):
    """Logits of a fresh (tp, pp) model after loading the model weights of `ckpt_dir`."""
    from megatron.core import parallel_state as ps

    from vcppo_megatron.checkpoint import load_checkpoint

    model, pgc = _setup(tp, pp, hf_config, seed=7)
    try:
        load_checkpoint(ckpt_dir, model=model.eval(), pg_collection=pgc, load_rng=False)
        return _logits(model, pgc, hf_config.hidden_size)
    finally:
        ps.destroy_model_parallel()


def _check_converted_and_resharded(rank: int, converted: dict[str, str], work: Path) -> None:
    """Checks 1 and 2."""
    from megatron.core import parallel_state as ps

    from vcppo_megatron.checkpoint import load_checkpoint, save_checkpoint

    for name, mg_dir in converted.items():
        hf = tiny_hf_model(name)
        ids, _ = tiny_batch()
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
        model, pgc = _setup(2, 1, hf.config, seed=3)
        try:
            load_checkpoint(mg_dir, model=model.eval(), pg_collection=pgc, load_rng=False)
            tp2 = _logits(model, pgc, hf.config.hidden_size)
            save_checkpoint(work / f"tp2_{name}", 10, model=model, pg_collection=pgc,
                            model_config=hf.config.to_dict())
        finally:
            ps.destroy_model_parallel()
        pp2 = _load_logits(1, 2, mg_dir, hf.config)
        diffs = {"converted TP=2 vs HF": float((tp2 - ref).abs().max())}
        if pp2 is not None:
            diffs["converted PP=2 vs HF"] = float((pp2 - ref).abs().max())
        pp2 = _load_logits(1, 2, str(work / f"tp2_{name}"), hf.config)
        tp1 = _load_logits(1, 1, str(work / f"tp2_{name}"), hf.config)
        if pp2 is not None:
            diffs["saved TP=2 -> PP=2"] = float((pp2 - tp2).abs().max())
        diffs["saved TP=2 -> TP=1"] = float((tp1 - tp2).abs().max())
        print(f"rank {rank} {name}: {diffs}", flush=True)
        for what, d in diffs.items():
            assert d <= (HF_TOL if "HF" in what else RESHARD_TOL), (rank, name, what, d)


def _rng_probe() -> tuple[float, float, float]:
    """One draw each from python's, numpy's and Megatron's tracker RNG (the torch CPU RNG draws the data)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = float(torch.rand(1))
    return random.random(), float(np.random.rand()), tracked


def _train(hf_config, ckpt_root: Path, *, resume: bool) -> tuple[list[float], tuple[float, float, float]]:
    """TP=1, DP=2 training with DDP + distributed Adam + cosine schedule; batches from the torch RNG.

    Uninterrupted (resume=False): steps 0..TOTAL_STEPS-1, checkpoint after SAVE_AT steps.
    Resumed: a fresh model/optimizer/scheduler (other init seed) loads that checkpoint and continues.
    Returns the losses of the steps run after SAVE_AT and the RNG probe taken right after the save / load."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from vcppo_megatron.checkpoint import load_checkpoint, save_checkpoint

    model, pgc = _setup(1, 1, hf_config, seed=11 if resume else 5)
    try:
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                      model, pg_collection=pgc)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01,
                                                     use_distributed_optimizer=True, clip_grad=1.0,
                                                     params_dtype=torch.float32), [ddp])
        sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2,
                                        lr_decay_steps=TOTAL_STEPS, lr_decay_style="cosine", start_wd=0.01,
                                        end_wd=0.01, wd_incr_steps=TOTAL_STEPS, wd_incr_style="constant")
        torch.manual_seed(1000 + dist.get_rank())          # per-rank data stream, part of the RNG state
        start, losses = 0, []
        if resume:
            state = load_checkpoint(ckpt_root, model=ddp, pg_collection=pgc, optimizer=opt, scheduler=sched,
                                    model_config=hf_config.to_dict())
            start = state["step"]
            assert state == {"step": SAVE_AT, "data_position": SAVE_AT * 2}, state
            probe = _rng_probe()
        for step in range(start, TOTAL_STEPS):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            ids = torch.randint(0, VOCAB, (2, 9))
            pos = torch.arange(9)[None].expand(2, -1)
            logits = ddp(ids, pos, None)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            ddp.finish_grad_sync()
            ok, _, _ = opt.step()
            assert ok
            sched.step(1)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, group=pgc.dp)
            if step >= SAVE_AT:
                losses.append(float(global_loss) / pgc.dp.size())
            if not resume and step + 1 == SAVE_AT:
                save_checkpoint(ckpt_root, step + 1, model=ddp, pg_collection=pgc, optimizer=opt,
                                scheduler=sched, training_state={"step": step + 1, "data_position": (step + 1) * 2},
                                model_config=hf_config.to_dict())
                probe = _rng_probe()
        return losses, probe
    finally:
        ps.destroy_model_parallel()


def _check_bad_loads(rank: int, hf_config, ckpt_root: Path, mg_dir: str) -> None:
    """Incompatible loads fail with CheckpointError naming the path and the problem."""
    from megatron.core import parallel_state as ps

    from vcppo_megatron.checkpoint import CheckpointError, load_checkpoint

    model, pgc = _setup(2, 1, hf_config)
    try:
        for path, kwargs, words in (
                (ckpt_root, {"load_rng": True}, "RNG states saved at layout"),
                # saved dp_reshardable at TP=1: checked before the optimizer is touched
                (ckpt_root, {"load_rng": False, "optimizer": object()}, "optimizer_format='fully_reshardable'"),
                (mg_dir, {"load_rng": True}, "has no rng state"),
                (ckpt_root / "nope", {}, "does not exist")):
            try:
                load_checkpoint(path, model=model, pg_collection=pgc, **kwargs)
            except CheckpointError as e:
                assert words in str(e) and str(Path(path).name) in str(e), str(e)
            else:
                raise AssertionError(f"no error for {path} {kwargs}")
    finally:
        ps.destroy_model_parallel()


def _worker(rank: int, world_size: int, converted: dict[str, str], work: str) -> None:
    from vcppo_megatron.platform import setup_device

    setup_device()
    work = Path(work)
    _check_converted_and_resharded(rank, converted, work)
    hf_config = tiny_hf_model("qwen2_untied").config
    ref, probe_saved = _train(hf_config, work / "train", resume=False)
    latest = (work / "train" / "latest").read_text().strip()
    meta = json.loads((work / "train" / latest / "vcppo_checkpoint.json").read_text())
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 2, "world_size": 2} and meta["step"] == SAVE_AT, meta
    resumed, probe_loaded = _train(hf_config, work / "train", resume=True)
    assert probe_loaded == probe_saved, (probe_saved, probe_loaded)     # python, numpy, tracker RNG restored
    diff = max(abs(a - b) for a, b in zip(ref, resumed))
    print(f"rank {rank}: losses uninterrupted {ref} resumed {resumed} max diff {diff:.3g}", flush=True)
    assert len(ref) == len(resumed) == TOTAL_STEPS - SAVE_AT and diff <= RESUME_TOL, (ref, resumed)
    _check_bad_loads(rank, hf_config, work / "train", converted[MODELS[0]])


def test_dist_checkpoint_reshard_convert_resume(tmp_path):
    from vcppo_megatron.checkpoint import convert_hf_to_megatron

    converted = {}
    for name in MODELS:
        tiny_hf_model(name).save_pretrained(tmp_path / name / "hf")
        converted[name] = str(convert_hf_to_megatron(tmp_path / name / "hf", tmp_path / name / "mg",
                                                     progress=False).parent)
    run_gloo(_worker, 2, converted, str(tmp_path))
    # the checkpoint the TP=2 ranks saved (no hf/ folder: config.json comes from the recorded config)
    # converts back to exactly the original HF tensors
    from safetensors.torch import load_file

    from vcppo_megatron.checkpoint import convert_megatron_to_hf

    for name in MODELS:
        back = convert_megatron_to_hf(tmp_path / f"tp2_{name}", tmp_path / name / "back", progress=False)
        a, b = load_file(tmp_path / name / "hf" / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
        assert json.loads((back / "config.json").read_text())["model_type"] == tiny_hf_model(name).config.model_type

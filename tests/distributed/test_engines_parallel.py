"""Engines on 2 gloo ranks, each layout with its own process groups in one process (no global
parallel_state): gradients of the real actor loss (global counts, several micro-batches) at TP=2,
PP=2 (tied embeddings) and DP=2, and with sequence parallelism and full activation recompute, equal
HF's full-batch autograd; critic values and value-loss gradients at those TP / PP layouts equal
HF's; one optimizer step per layout with the reference grad norm; a policy checkpoint with its optimizer state (`fully_reshardable`) saved at TP=2 resumes at TP=2,
PP=2 and DP=2 exactly like the uninterrupted TP=2 run. All checks share this one spawn."""
from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_gloo
from model_fixtures import VOCAB, tiny_hf_model

TOL = 1e-5
ROWS, SEQ, PROMPT = 6, 12, 3
BUDGET = 16                                   # tokens per micro-batch: 2-5 micro-batches per rank
# (TP, PP, engine options); (1, 1) on 2 ranks is DP=2. Sequence parallelism pads micro-batches to
# even lengths; full recompute reruns every layer in the backward pass.
LAYOUTS = ((2, 1, {}), (2, 1, dict(sequence_parallel=True, recompute_activations="full")),
           (1, 2, dict(recompute_activations="full")), (1, 1, {}))
ACTOR_KW = dict(eps_low=0.2, eps_high=0.28, loss_agg_mode="seq-mean-token-mean", nll_coef=0.1,
                entropy_coef=0.01)


def _batch() -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows with actor- and critic-loss inputs."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    lengths = torch.tensor([12, 5, 9, 7, 12, 4])
    pos = torch.arange(SEQ)[None]
    attn = (pos < lengths[:, None]).long()
    resp = ((pos >= PROMPT) & (pos < lengths[:, None])).float()
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "old_logprobs": -4.8 + 0.5 * torch.randn(ROWS, SEQ, generator=g),
            "advantages": torch.randn(ROWS, SEQ, generator=g),
            "is_positive": torch.tensor([True, False, True, False, False, True]),
            "returns": torch.randn(ROWS, SEQ, generator=g),
            "old_values": 0.1 * torch.randn(ROWS, SEQ, generator=g)}


def _actor_loss(counts):
    from vcppo_megatron.algorithms.losses import actor_loss

    def loss_fn(o, mb):
        return actor_loss(o["log_probs"], mb["old_logprobs"], mb["advantages"], mb["response_mask"],
                          counts, is_positive=mb["is_positive"], entropy=o["entropy"], **ACTOR_KW)
    return loss_fn


def _critic_loss(counts):
    from vcppo_megatron.algorithms.losses import critic_loss

    def loss_fn(o, mb):
        return critic_loss(o["values"], mb["old_values"], mb["returns"], mb["response_mask"], counts,
                           value_clip=0.2)
    return loss_fn


def _references(batch):
    """HF full-batch actor grads (Megatron names), critic values and critic grads, and the RM state."""
    from vcppo_megatron.algorithms.losses import global_counts
    from vcppo_megatron.checkpoint import hf_to_megatron

    counts = global_counts(batch["response_mask"], batch["is_positive"])
    hf = tiny_hf_model("qwen2_tied")
    ids = batch["input_ids"]
    logp_all = torch.log_softmax(hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits, -1)
    zero = torch.zeros(ROWS, 1)
    lp = torch.cat([zero, logp_all[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]], 1)
    ent = torch.cat([zero, -(logp_all.exp() * logp_all).sum(-1)[:, :-1]], 1)
    _actor_loss(counts)({"log_probs": lp, "entropy": ent}, batch)[0].backward()
    conv = dict(num_heads=4, num_query_groups=2)
    actor = hf_to_megatron({k: p.grad for k, p in hf.named_parameters() if k != "lm_head.weight"},
                           tie_word_embeddings=True, **conv)

    lm = tiny_hf_model("qwen2_untied")
    score = 0.3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    rm_state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    rm_state["score.weight"] = score
    head = torch.nn.Linear(64, 1, bias=False)
    head.weight.data.copy_(score)
    hidden = lm.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    values = head(hidden)[..., 0]
    _critic_loss(counts)({"values": values}, batch)[0].backward()
    grads = {k: p.grad for k, p in lm.named_parameters() if k != "lm_head.weight"}
    critic = hf_to_megatron(grads, tie_word_embeddings=False, **conv)
    critic["output_layer.weight"] = head.weight.grad
    critic["output_layer.bias"] = torch.zeros(1)   # placeholder: checked against Σ dL/dV
    return hf, lm.config, rm_state, actor, values.detach(), critic, counts


def _expected(ref: dict, layout) -> dict:
    """The part of full reference grads this rank holds: its PP stage's TP shard."""
    from vcppo_megatron.checkpoint import pp_stage, tp_shard
    from vcppo_megatron.engines.core import stage_layers

    tied = "output_layer.weight" not in ref
    stage = pp_stage(ref, layers=stage_layers(2, layout), pre_process=layout.is_first_stage,
                     post_process=layout.is_last_stage, tie_word_embeddings=tied)
    return {k: tp_shard(k, v, tp_rank=layout.tp_rank, tp_size=layout.tp, num_query_groups=2)
            for k, v in stage.items()}


def _max_diff(got: dict, want: dict, skip: tuple = ()) -> float:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    return max(float((got[k] - want[k]).abs().max()) for k in got if k not in skip)


def _nll_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    pos = torch.arange(SEQ)[None]
    lengths = torch.tensor([12, 5, 9, 7, 12, 4])
    return {"input_ids": ids, "attention_mask": (pos < lengths[:, None]).long(),
            "response_mask": ((pos >= PROMPT) & (pos < lengths[:, None])).float()}


def _resumed_losses(hf, root: str, tp: int, pp: int, *, save: bool, optimizer: bool = True) -> list[float]:
    """Policy NLL training at (tp, pp) with Adam (lr 1e-2). save: one step, checkpoint (with the
    optimizer state, `fully_reshardable`), then three more; else: load that checkpoint (with or
    without its optimizer state) and run the same three. Returns the global losses of those three."""
    from vcppo_megatron.checkpoint import load_checkpoint, save_checkpoint
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.parallel.groups import build_role_groups

    pgs, layout = build_role_groups(tp, pp)
    policy = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-2, grad_clip=1.0),
                          attention_backend="sdpa", max_tokens_per_micro_batch=BUDGET)
    policy.load_hf_state(hf.state_dict())

    def step(batch) -> float:
        tokens = float(batch["response_mask"].sum())
        mine = {k: v[layout.dp_rank::layout.dp] for k, v in batch.items()}

        def loss_fn(o, mb):
            return -(o["log_probs"] * mb["response_mask"]).sum() / tokens, {}

        policy.zero_grad()
        with policy.train_mode():
            lp = policy.forward_backward(mine, loss_fn)["outputs"]["log_probs"]
        loss = (-(lp * mine["response_mask"]).sum() / tokens).reshape(1)
        torch.distributed.all_reduce(loss, group=pgs.dp)
        assert policy.step()["stepped"]
        return float(loss)

    core = policy.core
    if save:
        step(_nll_batch(1))
        save_checkpoint(root, 1, model=core.model, pg_collection=pgs, optimizer=core.optimizer,
                        scheduler=core.scheduler, optimizer_format="fully_reshardable")
    else:
        load_checkpoint(root, model=core.model, pg_collection=pgs, optimizer=core.optimizer if optimizer else None,
                        scheduler=core.scheduler, load_rng=False)
        if not optimizer:
            core.optimizer.reload_model_params()
    return [step(_nll_batch(seed)) for seed in (2, 3, 4)]


def _check_optimizer_resharding(hf, root: str) -> list[str]:
    """Uninterrupted TP=2 vs resumed at TP=2, PP=2 (tied embeddings on the last stage), DP=2."""
    ref = _resumed_losses(hf, root, 2, 1, save=True)
    report = []
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        got = _resumed_losses(hf, root, tp, pp, save=False)
        diff = max(abs(a - b) for a, b in zip(ref, got))
        assert diff <= TOL, (tp, pp, ref, got)
        report.append(f"optimizer state TP=2 -> TP={tp} PP={pp}: losses {got} (uninterrupted {ref}), "
                      f"max diff {diff:.2e}")
    # the check can tell: without the optimizer state, Adam restarts and the later losses move
    fresh = _resumed_losses(hf, root, 1, 2, save=False, optimizer=False)
    moved = max(abs(f - r) for f, r in zip(fresh[1:], ref[1:]))
    assert fresh[0] == pytest.approx(ref[0], abs=TOL) and moved > 100 * TOL, (fresh, ref)
    return report


def _worker(rank: int, world_size: int, work: str) -> None:
    from vcppo_megatron.algorithms.losses import global_counts
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine, ValueEngine
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.platform import setup_device

    setup_device()
    batch = _batch()
    hf, lm_config, rm_state, actor_ref, values_ref, critic_ref, counts = _references(batch)
    # the same weights as HF directories, for the per-parameter loader (load_hf_dir)
    import tempfile

    from safetensors.torch import save_file

    dirs = tempfile.TemporaryDirectory(prefix=f"engines_rank{rank}_")
    lm_dir, rm_dir = f"{dirs.name}/lm", f"{dirs.name}/rm"
    for path, state in ((lm_dir, hf.state_dict()), (rm_dir, rm_state)):   # (save_pretrained writes on rank 0 only)
        os.makedirs(path)
        save_file({k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  f"{path}/model.safetensors")
    ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in actor_ref.values())))
    kw = dict(optim=OptimConfig(lr=1e-4, grad_clip=1.0), attention_backend="sdpa",
              max_tokens_per_micro_batch=BUDGET)
    report = []
    for tp, pp, extra in LAYOUTS:
        pgs, layout = build_role_groups(tp, pp)
        if layout.dp > 1:                                   # this DP rank's rows; counts stay global
            mine = {k: v[layout.dp_rank::layout.dp] for k, v in batch.items()}
            local_counts = global_counts(mine["response_mask"], mine["is_positive"], group=pgs.dp)
            assert local_counts == counts
        else:
            mine = batch
        policy = PolicyEngine(hf.config, pgs, layout, logprob_chunk_size=4, **kw, **extra)
        policy.load_hf_dir(lm_dir)                          # per parameter, from safetensors
        # default path (grads reduce-scattered over DP): the optimizer's grad norm is the reference's
        policy.zero_grad()
        with policy.train_mode():
            out = policy.forward_backward(mine, _actor_loss(counts))
        assert out["num_micro_batches"] >= 2
        stats = policy.step()
        assert stats["stepped"] and abs(stats["grad_norm"] - ref_norm) <= 1e-5 * ref_norm, (stats, ref_norm)
        # reload the weights after the step, then compare full gradients element-wise
        policy.load_hf_state(hf.state_dict())
        policy.zero_grad()
        with policy.train_mode():
            policy.forward_backward(mine, _actor_loss(counts), full_grads=True)
        d_actor = _max_diff(policy.core.main_grads(), _expected(actor_ref, layout))
        assert d_actor <= TOL, (tp, pp, extra, d_actor)
        line = f"TP={tp} PP={pp} DP={layout.dp} {extra}: actor |grad - HF| {d_actor:.2e} " \
               f"grad_norm {stats['grad_norm']:.6f} (HF {ref_norm:.6f})"
        if layout.dp == 1:                                  # critic at TP=2 and PP=2
            critic = ValueEngine(lm_config, pgs, layout, **kw, **extra)
            critic.load_hf_dir(rm_dir, init_from="reward_model")
            critic.zero_grad()
            with critic.train_mode():
                out = critic.forward_backward(batch, _critic_loss(counts), full_grads=True)
            valid = batch["attention_mask"].bool()
            d_values = float((out["outputs"]["values"] - values_ref)[valid].abs().max())
            got = critic.core.main_grads()
            d_critic = _max_diff(got, _expected(critic_ref, layout), skip=("output_layer.bias",))
            assert d_values <= TOL and d_critic <= TOL, (d_values, d_critic)
            if layout.is_last_stage:                        # d loss / d bias = Σ_t d loss / d V_t
                v = values_ref.clone().requires_grad_(True)
                _critic_loss(counts)({"values": v}, batch)[0].backward()
                d_bias = float((got["output_layer.bias"] - v.grad.sum()).abs().max())
                assert d_bias <= TOL and float(v.grad.abs().sum()) > 0, d_bias
            assert critic.step()["stepped"]
            line += f"; critic |values - HF| {d_values:.2e} |grad - HF| {d_critic:.2e}"
        report.append(line)
    report += _check_optimizer_resharding(hf, f"{work}/reshard")
    from megatron.core import parallel_state

    # every layout ran on its own explicit groups: megatron's global parallel state was never set up
    assert not parallel_state.model_parallel_is_initialized()
    for line in report:
        print(f"rank {rank} {line}", flush=True)


def test_engines_match_hf_at_tp2_pp2_dp2(tmp_path):
    run_gloo(_worker, 2, str(tmp_path))

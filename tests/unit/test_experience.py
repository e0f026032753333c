"""Experience layout (prompt + response rows) and the PPO update against independent float64 loops.

Layout contract (vcppo_megatron/trainer/experience.py): row i is prompt_i + response_i, right-padded
to S; response token j of row i sits at position p_i + j; the policy's log_probs[:, t] score token t;
the critic's value of token t is the value head's output at t - 1. The references below index those
positions with explicit Python loops and run the losses on response-aligned [N, R] tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import pytest
import torch
from torch import Tensor

from vcppo_megatron.algorithms.losses import actor_loss, critic_loss, global_counts
from vcppo_megatron.config.schema import AlgoConfig
from vcppo_megatron.engines.batching import split_micro_batches
from vcppo_megatron.trainer.experience import Samples, build_experience, gather_samples, values_of_tokens
from vcppo_megatron.trainer.ppo import actor_loss_fn, critic_loss_fn, ppo_update

F64 = torch.float64
PAD = 0
# (prompt length, response length) per row: different prompt and response lengths, a 1-token
# response, a 1-token prompt, and rows where the longest row is neither the longest prompt nor
# the longest response
LENS = [(3, 5), (1, 7), (6, 1), (2, 2), (5, 4), (4, 6)]
REWARDS = [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]


def _samples(lens=LENS, rewards=REWARDS, seed: int = 0) -> Samples:
    """Hand-made samples with random non-pad token ids."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, 100, (n,), generator=g).tolist()  # noqa: E731
    return Samples(prompt_ids=[rand(p) for p, _ in lens], response_ids=[rand(r) for _, r in lens],
                   rewards=list(rewards), truncated=[i % 2 == 0 for i in range(len(lens))],
                   prompt_index=[i // 2 for i in range(len(lens))], num_skipped_prompts=1)


def _loop_to_response(full: Tensor, lens) -> Tensor:
    """[N, S] -> [N, R] float64: out[i, j] = full[i, p_i + j] for j < r_i, else 0."""
    out = torch.zeros(len(lens), max(r for _, r in lens), dtype=F64)
    for i, (p, r) in enumerate(lens):
        for j in range(r):
            out[i, j] = float(full[i, p + j])
    return out


def _loop_to_full(resp: Tensor, lens) -> Tensor:
    """[N, R] -> [N, S] float64: out[i, p_i + j] = resp[i, j] for j < r_i, else 0."""
    out = torch.zeros(len(lens), max(p + r for p, r in lens), dtype=F64)
    for i, (p, r) in enumerate(lens):
        for j in range(r):
            out[i, p + j] = float(resp[i, j])
    return out


def _loop_values(head: Tensor, lens) -> Tensor:
    """Value-head outputs [N, S] -> [N, R] float64 V(s) of response token j: head[i, p_i + j - 1]."""
    out = torch.zeros(len(lens), max(r for _, r in lens), dtype=F64)
    for i, (p, r) in enumerate(lens):
        for j in range(r):
            out[i, j] = float(head[i, p + j - 1])
    return out


def _loop_mask(lens) -> Tensor:
    """[N, R] float64 response mask."""
    out = torch.zeros(len(lens), max(r for _, r in lens), dtype=F64)
    for i, (_, r) in enumerate(lens):
        for j in range(r):
            out[i, j] = 1.0
    return out


# ---- 1. build_experience -------------------------------------------------------------------

def test_build_experience_matches_loop_construction():
    s = _samples()
    exp = build_experience(s, PAD)
    seq = max(p + r for p, r in LENS)
    ids = [[PAD] * seq for _ in LENS]
    attn = [[0] * seq for _ in LENS]
    loss = [[0.0] * seq for _ in LENS]
    for i, (p, r) in enumerate(LENS):
        for t in range(p):
            ids[i][t], attn[i][t] = s.prompt_ids[i][t], 1
        for j in range(r):
            ids[i][p + j], attn[i][p + j], loss[i][p + j] = s.response_ids[i][j], 1, 1.0
    assert exp.input_ids.dtype == torch.long and exp.input_ids.tolist() == ids
    assert exp.attention_mask.dtype == torch.long and exp.attention_mask.tolist() == attn
    assert exp.loss_mask.dtype == torch.float32 and exp.loss_mask.tolist() == loss
    assert exp.prompt_lens.tolist() == [p for p, _ in LENS]
    assert exp.response_lens.tolist() == [r for _, r in LENS]
    assert exp.rewards.dtype == torch.float32 and exp.rewards.tolist() == REWARDS
    assert exp.truncated.dtype == torch.bool and exp.truncated.tolist() == s.truncated
    assert exp.max_response_len == max(r for _, r in LENS)


def test_experience_to_moves_every_tensor_and_keeps_the_layout():
    exp = build_experience(_samples(), PAD)
    moved = exp.to(torch.device("meta"))
    for name in ("input_ids", "attention_mask", "loss_mask", "prompt_lens", "response_lens", "rewards",
                 "truncated"):
        a, b = getattr(exp, name), getattr(moved, name)
        assert b.device.type == "meta" and a.device.type == "cpu" and (a.shape, a.dtype) == (b.shape, b.dtype)
    assert moved.max_response_len == exp.max_response_len       # read once on the host
    same = exp.to("cpu")
    assert same.input_ids is exp.input_ids                        # no copy when already there


def test_build_experience_rejects_empty_batch_and_empty_response():
    with pytest.raises(ValueError, match="no samples to train on"):
        build_experience(Samples([], [], [], [], [], 3), PAD)
    s = _samples()
    s.response_ids[2] = []
    with pytest.raises(ValueError, match=r"response has no tokens: expected >= 1"):
        build_experience(s, PAD)


# ---- 2. to_response / to_full / response_mask / token_rewards ------------------------------

def test_response_views_match_loops_and_round_trip():
    exp = build_experience(_samples(), PAD)
    g = torch.Generator().manual_seed(1)
    n, s = exp.input_ids.shape
    full = torch.randn(n, s, generator=g, dtype=F64) + 5.0      # nonzero everywhere, padding included
    resp = torch.randn(n, exp.max_response_len, generator=g, dtype=F64) + 5.0
    mask = _loop_mask(LENS)
    assert torch.equal(exp.response_mask(), mask.float())
    assert torch.equal(exp.to_response(full), _loop_to_response(full, LENS))
    assert torch.equal(exp.to_full(resp), _loop_to_full(resp, LENS))
    assert exp.to_full(resp).dtype == F64 and exp.to_response(full).dtype == F64
    # round trips: full -> response -> full keeps the response positions only, and back
    assert torch.equal(exp.to_full(exp.to_response(full)), full * exp.loss_mask.double())
    assert torch.equal(exp.to_response(exp.to_full(resp)), resp * mask)
    # float32 (what the engines and GAE produce) goes through unchanged too
    assert torch.equal(exp.to_full(resp.float()), _loop_to_full(resp, LENS).float())


def test_values_land_on_response_tokens():
    """to_response(values_of_tokens(head)) puts head[i, p_i + j - 1] on response token j."""
    exp = build_experience(_samples(), PAD)
    head = torch.randn(exp.input_ids.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = exp.to_response(values_of_tokens(head))
    assert torch.equal(got, _loop_values(head, LENS)), \
        "V of the first response token must be the value head's output at the last prompt token"


def test_token_rewards_on_last_response_token_only():
    exp = build_experience(_samples(), PAD)
    want = torch.zeros(len(LENS), exp.max_response_len, dtype=F64)
    for i, (_, r) in enumerate(LENS):
        want[i, r - 1] = REWARDS[i]
    got = exp.token_rewards()
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)


# ---- 3. values_of_tokens -------------------------------------------------------------------

def test_values_of_tokens_shifts_right_by_one():
    v = torch.randn(4, 7, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = values_of_tokens(v)
    assert got.shape == v.shape and got.dtype == v.dtype
    for i in range(4):
        assert float(got[i, 0]) == 0.0
        for t in range(1, 7):
            assert float(got[i, t]) == float(v[i, t - 1])


# ---- 4. loss closures on the [N, S] layout vs losses on loop-built [N, R] tensors ------------

def _algo(mode: str) -> AlgoConfig:
    """Every feature of the closures on: clip-higher, dual clip, NLL, entropy bonus, value clip.
    `mode` aggregates the role under test: the actor's loss_agg_mode and the critic's
    critic_loss_agg_mode (the other role gets the other mode, so neither can read the wrong one)."""
    other = {"token-mean": "seq-mean-token-mean", "seq-mean-token-mean": "token-mean"}[mode]
    return AlgoConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, loss_agg_mode=mode, value_clip=0.2,
                      nll_coef=0.1, entropy_coef=0.01, critic_loss_agg_mode=other)


def _role_algo(role: str, mode: str) -> AlgoConfig:
    """`_algo` with `mode` on the role under test and the other mode on the other role."""
    algo = _algo(mode)
    if role == "critic":
        algo = dataclasses.replace(algo, loss_agg_mode=algo.critic_loss_agg_mode, critic_loss_agg_mode=mode)
    return algo


def _problem(seed: int = 4):
    """Experience, fake engine outputs [N, S] (float32, as the engines give) and the [N, S] batch."""
    exp = build_experience(_samples(seed=seed), PAD)
    g = torch.Generator().manual_seed(seed)
    n, s = exp.input_ids.shape
    r = exp.max_response_len
    engine_out = {"log_probs": -3.0 * torch.rand(n, s, generator=g),  # <= 0 like real log-probs
                  "entropy": 2.0 * torch.rand(n, s, generator=g),
                  "values": torch.randn(n, s, generator=g)}
    old_lp = (engine_out["log_probs"] + torch.randn(n, s, generator=g)) * exp.loss_mask
    adv_r = 1.5 * torch.randn(n, r, generator=g) * exp.response_mask()
    ret_r = torch.randn(n, r, generator=g) * exp.response_mask()
    old_v_r = (exp.to_response(values_of_tokens(engine_out["values"]))
               + 0.3 * torch.randn(n, r, generator=g)) * exp.response_mask()
    batch = {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask, "loss_mask": exp.loss_mask,
             "is_positive": exp.rewards > 0, "old_log_probs": old_lp, "advantages": exp.to_full(adv_r),
             "old_values": exp.to_full(old_v_r), "returns": exp.to_full(ret_r), "row_id": torch.arange(n)}
    raw = {"old_lp": old_lp, "adv_r": adv_r, "ret_r": ret_r, "old_v_r": old_v_r}
    return exp, engine_out, batch, raw


def _reference(role: str, algo: AlgoConfig, engine_out, raw, rows: list[int]):
    """Loss, metrics and d loss / d engine output [len(rows), S] of `rows`, float64, from loops."""
    lens = [LENS[i] for i in rows]
    mask = _loop_mask(lens)
    sub = lambda t: t[rows]  # noqa: E731
    sub_r = lambda t: t[rows][:, :mask.shape[1]].double() * mask  # noqa: E731  [N, R] inputs
    is_pos = torch.tensor([REWARDS[i] > 0 for i in rows])
    counts = global_counts(mask, is_pos)
    if role == "actor":
        lp = _loop_to_response(sub(engine_out["log_probs"]), lens).requires_grad_(True)
        ent = _loop_to_response(sub(engine_out["entropy"]), lens).requires_grad_(True)
        loss, m = actor_loss(lp, _loop_to_response(sub(raw["old_lp"]), lens),
                             sub_r(raw["adv_r"]), mask, counts, eps_low=algo.eps_low,
                             eps_high=algo.eps_high, loss_agg_mode=algo.loss_agg_mode,
                             dual_clip=algo.dual_clip, is_positive=is_pos, nll_coef=algo.nll_coef,
                             entropy=ent, entropy_coef=algo.entropy_coef)
        g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
        # d/d log_probs[i, p_i + j] and d/d entropy[i, p_i + j]
        grad = {"log_probs": _loop_to_full(g_lp, lens), "entropy": _loop_to_full(g_ent, lens)}
    else:
        v = _loop_values(sub(engine_out["values"]), lens).requires_grad_(True)
        loss, m = critic_loss(v, sub_r(raw["old_v_r"]), sub_r(raw["ret_r"]), mask, counts,
                              value_clip=algo.value_clip, loss_agg_mode=algo.critic_loss_agg_mode)
        (g_resp,) = torch.autograd.grad(loss, v)
        g_head = torch.zeros(len(lens), max(p + r for p, r in lens), dtype=F64)
        for i, (p, r) in enumerate(lens):                      # d/d head[i, p_i + j - 1]
            for j in range(r):
                g_head[i, p + j - 1] = float(g_resp[i, j])
        grad = {"values": g_head}
    return loss.detach(), {k: v.detach() for k, v in m.items()}, grad


def _run_closure(fn, engine_out, batch, micro_tokens: int | None):
    """Call a loss closure like an engine: whole batch, or length-sorted trimmed micro-batches."""
    n, s = batch["input_ids"].shape
    leaves = {k: v.clone().requires_grad_(True) for k, v in engine_out.items()}
    if micro_tokens is None:
        parts = [(torch.arange(n), s, batch)]
    else:
        parts = [(mb.rows, mb.seq_len, mb.data) for mb in split_micro_batches(batch, micro_tokens)]
    total, metrics = torch.zeros((), dtype=F64), {}
    for rows, seq, data in parts:
        outs = {k: v[rows][:, :seq] for k, v in leaves.items()}
        loss, m = fn(outs, data)
        loss.backward()
        total = total + loss.detach().double()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().double()
    return total, metrics, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("role", ["actor", "critic"])
@pytest.mark.parametrize("micro_tokens", [None, 20])
def test_loss_closures_match_response_aligned_losses(role, mode, micro_tokens):
    exp, engine_out, batch, raw = _problem()
    algo = _role_algo(role, mode)
    n = len(LENS)
    ref_loss, ref_m, ref_grad = _reference(role, algo, engine_out, raw, list(range(n)))
    # the closures see the counts of the whole (mini-)batch, taken on the [N, S] loss mask
    counts = global_counts(batch["loss_mask"], batch["is_positive"])
    assert counts == global_counts(_loop_mask(LENS), torch.tensor(REWARDS) > 0)
    fn = (actor_loss_fn if role == "actor" else critic_loss_fn)(algo, counts)
    if micro_tokens is not None:   # trimmed micro-batches, some of several rows
        sizes = [len(mb.rows) for mb in split_micro_batches(batch, micro_tokens)]
        assert len(sizes) > 1 and max(sizes) > 1, sizes
    loss, metrics, grads = _run_closure(fn, engine_out, batch, micro_tokens)
    assert sorted(metrics) == sorted(ref_m)
    assert abs(float(loss) - float(ref_loss)) < 1e-6, (role, mode, float(loss), float(ref_loss))
    for k in ref_m:
        assert abs(float(metrics[k]) - float(ref_m[k])) < 1e-6, (k, float(metrics[k]), float(ref_m[k]))
    for key, want in ref_grad.items():   # zero off the response tokens, loop values on them
        torch.testing.assert_close(grads[key].double(), want, atol=1e-7, rtol=1e-5, msg=key)
    # every feature was exercised (else the comparison above proves less than it claims)
    if role == "actor":
        for k in ("actor/clip_low_frac", "actor/clip_high_frac", "actor/clip_dual_frac", "actor/nll_loss"):
            assert float(ref_m[k]) > 0, k
    else:
        assert float(ref_m["critic/value_clip_frac"]) > 0


def test_loss_closures_ignore_prompt_and_padding_outputs():
    """Garbage engine outputs off the response tokens (prompt, padding, critic's last position)
    change nothing: the closures read log-probs at p_i + j and values at p_i + j - 1 only."""
    exp, engine_out, batch, raw = _problem()
    n, s = exp.input_ids.shape
    off_lp = torch.ones(n, s, dtype=torch.bool)
    off_v = torch.ones(n, s, dtype=torch.bool)
    for i, (p, r) in enumerate(LENS):
        for j in range(r):
            off_lp[i, p + j] = False
            off_v[i, p + j - 1] = False
    noisy = {"log_probs": torch.where(off_lp, -50.0, engine_out["log_probs"]),
             "entropy": torch.where(off_lp, 1e3, engine_out["entropy"]),
             "values": torch.where(off_v, -1e3, engine_out["values"])}
    for role in ("actor", "critic"):
        algo = _algo("token-mean")
        counts = global_counts(batch["loss_mask"], batch["is_positive"])
        fn = (actor_loss_fn if role == "actor" else critic_loss_fn)(algo, counts)
        clean_loss, clean_m, _ = _run_closure(fn, engine_out, batch, None)
        noisy_loss, noisy_m, _ = _run_closure(fn, noisy, batch, None)
        assert abs(float(clean_loss) - float(noisy_loss)) < 1e-6, role
        for k in clean_m:
            assert abs(float(clean_m[k]) - float(noisy_m[k])) < 1e-6, (role, k)


def test_critic_loss_is_a_token_mean_by_default_whatever_the_actor_aggregates():
    """VC-PPO Alg. 1 regresses every state alike: with the default critic_loss_agg_mode and a
    sample-level actor loss, the critic's loss and gradient are Σ 0.5 (V(s_t) - R_t)² / (all
    response tokens), from a float64 loop over rows and tokens."""
    exp, engine_out, batch, raw = _problem()
    algo = AlgoConfig(loss_agg_mode="seq-mean-token-mean")
    assert algo.critic_loss_agg_mode == "token-mean"
    counts = global_counts(batch["loss_mask"], batch["is_positive"])
    loss, metrics, grads = _run_closure(critic_loss_fn(algo, counts), engine_out, batch, 20)
    head = engine_out["values"].double()
    total_tokens = sum(r for _, r in LENS)
    want, want_grad = 0.0, torch.zeros_like(head)
    for i, (p, r) in enumerate(LENS):
        for j in range(r):                      # V(s_t) of response token j: head output at p + j - 1
            err = float(head[i, p + j - 1]) - float(raw["ret_r"][i, j])
            want += 0.5 * err * err / total_tokens
            want_grad[i, p + j - 1] = err / total_tokens
    assert abs(float(loss) - want) < 1e-6 and abs(float(metrics["critic/value_loss"]) - want) < 1e-6
    torch.testing.assert_close(grads["values"].double(), want_grad, atol=1e-7, rtol=1e-5)
    seq = _run_closure(critic_loss_fn(dataclasses.replace(algo, critic_loss_agg_mode="seq-mean-token-mean"),
                                      counts), engine_out, batch, 20)[0]
    assert abs(float(seq) - want) > 1e-3        # the modes differ on this batch: the check has teeth


# ---- 5. ppo_update with a fake engine ------------------------------------------------------

class FakeEngine:
    """Engine stand-in: per-token outputs are leaf tensors [N, S] indexed by the batch's row_id;
    forward_backward runs loss_fn on length-sorted trimmed micro-batches and back-propagates."""

    def __init__(self, outputs: dict[str, Tensor], micro_tokens: int):
        self.params = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        self.micro_tokens = micro_tokens
        self.events: list[str] = []
        self.rows: list[list[int]] = []            # rows of each forward_backward (mini-batch)
        self.step_metrics: list[dict[str, float]] = []
        self.step_grads: list[dict[str, Tensor]] = []
        self.norms: list[float] = []
        self.training = False

    def zero_grad(self) -> None:
        self.events.append("zero_grad")
        for p in self.params.values():
            p.grad = None

    @contextlib.contextmanager
    def train_mode(self) -> Iterator[None]:
        self.events.append("enter")
        self.training = True
        try:
            yield
        finally:
            self.training = False
            self.events.append("exit")

    def forward_backward(self, batch: dict[str, Tensor], loss_fn, *, return_outputs: bool = True) -> dict:
        assert self.training, "forward_backward outside train_mode"
        assert not return_outputs, "a PPO update reads only the losses: it asks for no per-token outputs"
        self.events.append("forward_backward")
        self.rows.append(batch["row_id"].tolist())
        metrics: dict[str, Tensor] = {}
        for mb in split_micro_batches(batch, self.micro_tokens):
            outs = {k: p[mb.data["row_id"]][:, :mb.seq_len] for k, p in self.params.items()}
            loss, m = loss_fn(outs, mb.data)
            loss.backward()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach()
        self.step_metrics.append({k: float(v) for k, v in metrics.items()})
        return {"metrics": metrics, "outputs": {}, "num_micro_batches": 0}

    def step(self) -> dict[str, float]:
        self.events.append("step")
        grads = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for k, p in self.params.items()}
        self.step_grads.append(grads)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        self.norms.append(norm)
        return {"grad_norm": norm, "lr": 0.01 * len(self.norms), "stepped": True}


def test_ppo_update_visits_rows_once_per_epoch_and_averages_over_steps():
    exp, engine_out, batch, _ = _problem()
    n, epochs, mini = len(LENS), 3, 2
    per = n // mini
    engine = FakeEngine(engine_out, micro_tokens=12)
    seen_counts = []

    def make_loss_fn(counts):
        seen_counts.append(counts)

        def loss_fn(outs, mb):
            loss = (outs["values"] * mb["loss_mask"]).sum() / counts.num_tokens
            return loss, {"probe/rows": torch.tensor(float(len(mb["row_id"])), dtype=F64),
                          "probe/token_share": mb["loss_mask"].sum().double() / counts.num_tokens,
                          "probe/row_id_sum": mb["row_id"].sum().double()}

        return loss_fn

    res = ppo_update(engine, batch, make_loss_fn, epochs=epochs, mini_batches=mini,
                     generator=torch.Generator().manual_seed(5), dp_group=None)
    total = epochs * mini
    assert res.optimizer_steps == total
    assert engine.events == ["zero_grad", "enter", "forward_backward", "exit", "step"] * total
    assert len(engine.rows) == total and all(len(r) == per for r in engine.rows)
    for e in range(epochs):
        visited = sorted(i for rows in engine.rows[e * mini:(e + 1) * mini] for i in rows)
        assert visited == list(range(n)), f"epoch {e} visited {visited}: expected each row once"
    # counts are those of each mini-batch (global_counts once per optimizer step), from loops
    assert len(seen_counts) == total
    for rows, c in zip(engine.rows, seen_counts):
        assert c.num_tokens == sum(LENS[i][1] for i in rows)
        assert c.num_seqs == len(rows)
        assert c.num_positive_tokens == sum(LENS[i][1] for i in rows if REWARDS[i] > 0)
    # shares: sum over micro-batches per step, mean over optimizer steps
    assert res.shares["probe/rows"] == pytest.approx(per, abs=1e-12)
    assert res.shares["probe/token_share"] == pytest.approx(1.0, abs=1e-12)
    assert res.shares["probe/row_id_sum"] == pytest.approx(epochs * sum(range(n)) / total, abs=1e-12)
    assert res.grad_norm == pytest.approx(sum(engine.norms) / total, abs=1e-12)
    assert res.lr == pytest.approx(0.01 * total)
    # the generator alone decides the order
    again = FakeEngine(engine_out, micro_tokens=12)
    ppo_update(again, batch, make_loss_fn, epochs=epochs, mini_batches=mini,
               generator=torch.Generator().manual_seed(5), dp_group=None)
    assert again.rows == engine.rows


@pytest.mark.parametrize("role", ["actor", "critic"])
def test_ppo_update_steps_match_mini_batch_references(role):
    """Each optimizer step's summed micro-batch metrics and gradient equal the loss of its whole
    mini-batch (counts over the mini-batch), computed on loop-built [N, R] tensors."""
    exp, engine_out, batch, raw = _problem()
    algo = _role_algo(role, "seq-mean-token-mean" if role == "actor" else "token-mean")
    make = (lambda c: actor_loss_fn(algo, c)) if role == "actor" else (lambda c: critic_loss_fn(algo, c))
    engine = FakeEngine(engine_out, micro_tokens=10)
    res = ppo_update(engine, batch, make, epochs=2, mini_batches=3,
                     generator=torch.Generator().manual_seed(6), dp_group=None)
    assert res.optimizer_steps == 6
    sums: dict[str, float] = {}
    for rows, got_m, got_g in zip(engine.rows, engine.step_metrics, engine.step_grads):
        _, ref_m, ref_g = _reference(role, algo, engine_out, raw, rows)
        assert sorted(got_m) == sorted(ref_m)
        for k, v in ref_m.items():
            assert abs(got_m[k] - float(v)) < 1e-6, (rows, k, got_m[k], float(v))
            sums[k] = sums.get(k, 0.0) + float(v)
        s = max(LENS[i][0] + LENS[i][1] for i in rows)
        for key, want in ref_g.items():
            full = torch.zeros_like(got_g[key], dtype=F64)
            full[rows, :s] = want
            torch.testing.assert_close(got_g[key].double(), full, atol=1e-7, rtol=1e-5, msg=key)
    for k, v in sums.items():
        assert abs(res.shares[k] - v / 6) < 1e-6, k


def test_ppo_update_rejects_rows_not_divisible_by_mini_batches():
    _, engine_out, batch, _ = _problem()
    engine = FakeEngine(engine_out, micro_tokens=12)
    with pytest.raises(ValueError, match=r"6 rows on this data-parallel rank: expected a multiple of the 4"):
        ppo_update(engine, batch, lambda c: critic_loss_fn(_algo("token-mean"), c), epochs=1,
                   mini_batches=4, generator=torch.Generator().manual_seed(0), dp_group=None)
    assert engine.events == [], "nothing may run before the check"


# ---- 6. gather_samples -------------------------------------------------------------------

def test_gather_samples_without_group_returns_input():
    s = _samples()
    snapshot = (list(map(list, s.prompt_ids)), list(map(list, s.response_ids)), list(s.rewards),
                list(s.truncated), list(s.prompt_index), s.num_skipped_prompts)
    for contributes in (True, False):
        out = gather_samples(s, None, contributes)
        assert out is s
        assert (out.prompt_ids, out.response_ids, out.rewards, out.truncated, out.prompt_index,
                out.num_skipped_prompts) == snapshot


def test_logprob_abs_diff_compares_rollout_and_actor_on_response_tokens():
    """Rollout log-probs land on the response tokens' own positions, where the actor scores them."""
    from vcppo_megatron.trainer.experience import logprob_abs_diff

    s = _samples()
    g = torch.Generator().manual_seed(3)
    s.rollout_logprobs = [(-torch.rand(r, generator=g)).tolist() for _, r in LENS]
    exp = build_experience(s, PAD)
    assert logprob_abs_diff(exp) is None                      # the actor has not scored yet
    actor = torch.randn(exp.input_ids.shape, generator=g)     # prompt / padding positions: anything
    exp.actor_log_probs = actor
    diff = logprob_abs_diff(exp)
    for i, (p, r) in enumerate(LENS):
        for j in range(diff.shape[1]):
            want = abs(float(actor[i, p + j]) - s.rollout_logprobs[i][j]) if j < r else 0.0
            assert float(diff[i, j]) == pytest.approx(want, abs=1e-6), (i, j)
    s.rollout_logprobs = []                                   # not recorded: no metric
    assert build_experience(s, PAD).rollout_log_probs is None


# ---- 7. sample_and_score: the verifier runs on the rollout group's leader only ---------------

def test_sample_and_score_verifies_only_when_asked(monkeypatch):
    import vcppo_megatron.trainer.experience as experience
    from vcppo_megatron.config.schema import RewardConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.rollout.batch import pad_responses

    tok = build_tokenizer()

    class Rollout:
        def generate(self, prompts, n, **kw):
            resp = [tok("<think>1+2</think>\\boxed{3}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                    tok("<think>1+2</think>\\boxed{4}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
            return pad_responses([0, 0], [list(prompts[0])] * 2, resp, None, ["stop", "stop"], 0, 0, tok.pad_token_id)

    calls = []
    original = experience.batch_math_reward
    monkeypatch.setattr(experience, "batch_math_reward", lambda *a, **k: calls.append(a) or original(*a, **k))
    prompt = tok("1+2=", add_special_tokens=False)["input_ids"]
    kw = dict(samples_per_prompt=2, seed=0, reward_cfg=RewardConfig(num_workers=0))
    leader = experience.sample_and_score(Rollout(), [prompt], ["3"], tok, **kw)
    assert leader.rewards == [1.0, -1.0] and len(calls) == 1
    follower = experience.sample_and_score(Rollout(), [prompt], ["3"], tok, verify=False, **kw)
    assert follower.rewards == [] and len(calls) == 1            # no verifier call
    assert follower.response_ids == leader.response_ids and follower.prompt_index == [0, 0]

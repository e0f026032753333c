"""The trainer's critic path end to end on 2 gloo ranks (DP = 2): samples -> `build_experience` ->
ValueEngine values -> `values_of_tokens` -> decoupled GAE (λ = 1) -> `ppo_update` with
`critic_loss_fn`. On a return the critic can learn from the prompt (+1 when the first digit is even,
-1 otherwise), explained variance over the global batch must reach 0.9; the data-parallel replicas
must hold identical weights afterwards."""
from __future__ import annotations

import random

import torch
import torch.distributed as dist
from dist_utils import run_gloo

ITERATIONS, ROWS_PER_RANK = 12, 32


def _rows(tokenizer, rng: random.Random, n: int):
    from vcppo_megatron.trainer.experience import Samples

    prompts, responses, rewards = [], [], []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        prompts.append(tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"])
        # responses of different lengths, so padding and the response offsets vary per row
        body = f"<think>{a}+{b}</think>" * rng.randrange(1, 3) + f"\\boxed{{{a + b}}}"
        responses.append(tokenizer(body, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        rewards.append(1.0 if a % 2 == 0 else -1.0)
    return Samples(prompts, responses, rewards, [False] * n, list(range(n)))


def _critic_learns(rank: int, world: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.algorithms.gae import decoupled_gae
    from vcppo_megatron.algorithms.metrics import MetricAccumulator
    from vcppo_megatron.config.schema import AlgoConfig, OptimConfig
    from vcppo_megatron.data.synthetic import build_tokenizer
    from vcppo_megatron.engines import ValueEngine
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.trainer.experience import build_experience, values_of_tokens
    from vcppo_megatron.trainer.ppo import critic_loss_fn, ppo_update

    setup_device()
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128, tie_word_embeddings=True))
    pgs, layout = build_role_groups(1, 1)
    critic = ValueEngine(hf.config.to_dict(), pgs, layout, optim=OptimConfig(lr=3e-3),
                         attention_backend="sdpa")
    critic.load_hf_state(hf.state_dict(), init_from="policy")
    rng = random.Random(100 + rank)
    algo, history = AlgoConfig(), []
    for it in range(ITERATIONS):
        exp = build_experience(_rows(tokenizer, rng, ROWS_PER_RANK), tokenizer.pad_token_id)
        batch = {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask}
        with critic.eval_mode():
            values = values_of_tokens(critic.forward_backward(batch, None, True)["outputs"]["values"])
        values_r, mask = exp.to_response(values), exp.response_mask()
        _, returns = decoupled_gae(exp.token_rewards(), values_r, mask, gamma=1.0, lam_actor=0.95, lam_critic=1.0)
        torch.testing.assert_close(returns, exp.rewards[:, None] * mask, atol=1e-5, rtol=0,
                                   msg="λ = γ = 1 returns are the final reward")
        acc = MetricAccumulator()
        acc.add_explained_variance("ev", values_r, returns, mask)
        batch.update(loss_mask=exp.loss_mask, is_positive=exp.rewards > 0, old_values=exp.to_full(values_r),
                     returns=exp.to_full(returns))
        result = ppo_update(critic, batch, lambda c: critic_loss_fn(algo, c), epochs=1, mini_batches=2,
                            generator=torch.Generator().manual_seed(it), dp_group=pgs.dp)
        history.append((acc.reduce(dist.group.WORLD).get("ev", 0.0), result.shares["critic/value_loss"]))
    ev_end = max(ev for ev, _ in history[-3:])
    assert ev_end > 0.9, f"explained variance by iteration: {[round(e, 3) for e, _ in history]}"
    assert history[-1][1] < 0.2 * history[0][1], f"value loss by iteration: {[round(v, 4) for _, v in history]}"
    params = torch.cat([p.detach().flatten() for p in critic.core.raw_model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    assert torch.equal(gathered[0], gathered[1]), "data-parallel critics diverged"
    if rank == 0:
        print(f"critic EV by iteration: {[round(e, 3) for e, _ in history]}")


def test_critic_learns_a_learnable_return_on_two_ranks():
    run_gloo(_critic_learns, 2)

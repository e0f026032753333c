"""Per-token tensors stay on the engines' device from the forward passes to the losses (issue 14,
items 12-13), proved on CPU with a stand-in GPU (tests/fake_device.py).

One RL step of the real trainer (`Trainer._rl_step`, 1 gloo rank, the demo's tiny model and real
Megatron engines) runs with the engines reporting device cuda:0 and a TorchFunctionMode following
which tensors a GPU run would hold on the device. vLLM is replaced by a stand-in that returns
fixed samples (half of them correct); the Triton GAE kernel by a stand-in that records it was
called with device tensors and computes with the CPU kernel. Between the first forward pass and
the last loss, no per-token tensor (two or more dimensions) may be copied to the host or from the
host, and no op may mix device tensors with host tensors (a GPU raises or copies there); the loss
functions must receive only device tensors, and GAE must take the Triton path, once.
tests/unit/test_cuda_data_path.py runs the same body (`run_checked_rl_step`) on a real GPU.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from dist_utils import one_gloo_rank
from fake_device import FakeCudaMode
from vcppo_megatron.rollout.batch import pad_responses

ROOT = Path(__file__).resolve().parents[2]
# the trainer's data path: experience, GAE, PPO losses and the engines' schedule runner
CHECKED = ("trainer/loop.py", "trainer/experience.py", "trainer/ppo.py", "engines/core.py",
           "engines/batching.py", "engines/policy.py", "engines/value.py", "engines/logprobs.py",
           "algorithms/gae.py",
           "algorithms/losses.py")


class FakeRollout:
    """vLLM stand-in: for each prompt `a+b+...=`, n samples alternating a correct and a wrong answer."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def generate(self, prompts, n, *, greedy=False, seed=None, stop_token_ids=None, max_tokens=None,
                 logprobs=False):
        index, ps, responses = [], [], []
        for i, p in enumerate(prompts):
            terms = self.tok.decode(p).rstrip("=")
            total = sum(int(x) for x in terms.split("+"))
            for j in range(n):
                answer = total if j % 2 == 0 else total + 1 + j
                text = f"<think>{terms}</think>\\boxed{{{answer}}}"
                index.append(i)
                ps.append(list(p))
                responses.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        return pad_responses(index, ps, responses, None, ["stop"] * len(responses), 0, 0, self.tok.pad_token_id)

    def update_weights(self, named_tensors) -> None:
        for _ in named_tensors:
            pass

    def sleep(self, level: int = 1) -> bool:
        return False


def make_trainer(out: Path):
    """The demo's tiny trainer (in the current world) with the colocation started on FakeRollout."""
    from vcppo_megatron.config import load_config
    from vcppo_megatron.parallel.memory_timeline import Timeline
    from vcppo_megatron.trainer.colocation import Colocation
    from vcppo_megatron.trainer.loop import Trainer

    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml", [
        f"trainer.output_dir={out}", "batch.global_prompts_per_step=4", "batch.samples_per_prompt=2",
        "batch.global_mini_batch_size=4", "batch.micro_batch_size=2", "algo.nll_coef=0.1"])
    t = Trainer(cfg)
    t.colocation = Colocation(Timeline.from_config(cfg), {"actor": t.actor, "critic": t.critic})
    t.rollout = t.colocation.start_rollout(lambda: FakeRollout(t.tokenizer))
    return t


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    with one_gloo_rank():
        t = make_trainer(tmp_path_factory.mktemp("residency"))
        yield t
        t.writer.close()


def run_checked_rl_step(trainer, monkeypatch, mode: FakeCudaMode) -> dict:
    """One `Trainer._rl_step` under `mode` (the stand-in GPU, or with `mode.real` the real one),
    recording the transfers and, per call, whether GAE (Triton path) and the losses got device
    tensors; returns {"metrics", "gae_calls", "loss_inputs"}."""
    import vcppo_megatron.algorithms.gae as gae
    import vcppo_megatron.trainer.ppo as ppo

    hooks: list = []
    gae_calls: list = []
    if mode.real:                                            # the real kernel, watched
        import vcppo_megatron.algorithms.gae_triton as gae_triton

        kernel = gae_triton.decoupled_gae_triton

        def triton_watched(rewards, values, mask, *, out=None, **kw):
            gae_calls.append([mode.is_device(x) for x in (rewards, values, mask)])
            with torch.overrides._pop_mode_temporarily():
                return kernel(rewards, values, mask, out=out, **kw)

        monkeypatch.setattr(gae_triton, "decoupled_gae_triton", triton_watched)
    else:
        from vcppo_megatron.algorithms.gae_numba import decoupled_gae_cpu

        for engine in (trainer.actor, trainer.critic):
            monkeypatch.setattr(engine.core, "device", torch.device("cuda", 0))
            mode.mark(engine.core.raw_model.parameters())
            mode.mark(engine.core.raw_model.buffers())
            mode.mark(p.main_grad for p in engine.core.raw_model.parameters() if hasattr(p, "main_grad"))
            mode.mark(t for b in engine.core.model.buffers for t in (b.param_data, b.grad_data) if t is not None)
            # the model's outputs are on the device (marks do not follow Megatron's autograd Functions)
            hook = engine.core.model.register_forward_hook(lambda module, inputs, output: mode.mark(
                [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]))
            hooks.append(hook)

        def triton_stand_in(rewards, values, mask, *, out=None, **kw):
            gae_calls.append([mode.is_device(x) for x in (rewards, values, mask)])
            with torch.overrides._pop_mode_temporarily():                # compute as the kernel would
                adv, ret = decoupled_gae_cpu(rewards, values, mask, **kw)
            mode.mark([adv, ret])
            return adv, ret

        monkeypatch.setattr(gae, "_triton_available", lambda: True)
        monkeypatch.setitem(__import__("sys").modules, "vcppo_megatron.algorithms.gae_triton",
                            types.SimpleNamespace(decoupled_gae_triton=triton_stand_in))
    loss_inputs = []

    def checked(loss):
        def wrapped(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            loss_inputs.append((loss.__name__, all(mode.is_device(t) for t in tensors), len(tensors)))
            return loss(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ppo, "actor_loss", checked(ppo.actor_loss))
    monkeypatch.setattr(ppo, "critic_loss", checked(ppo.critic_loss))
    forward = trainer.critic.forward_backward

    def first_forward(*args, **kwargs):                      # the window opens at the values pass
        mode.phase = "forwards and losses"
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.critic, "forward_backward", first_forward)
    for name in ("_step_metrics", "_sync_rollout"):          # after the losses: host reads allowed
        original = getattr(trainer, name)

        def paused(*args, _original=original, **kwargs):
            mode.checking = False
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer, name, paused)
    try:
        with one_gloo_rank(), mode:
            metrics = trainer._rl_step("rl", 0)
    finally:
        for hook in hooks:
            hook.remove()
    return {"metrics": metrics, "gae_calls": gae_calls, "loss_inputs": loss_inputs}


def assert_stays_on_the_device(mode: FakeCudaMode, result: dict) -> None:
    """No per-token transfer or mixed op between the first forward pass and the last loss; rows
    moved in by experience.py only; GAE on the device through the Triton path, once; losses fed
    device tensors only; the step's rewards as FakeRollout made them."""
    assert mode.phase == "forwards and losses" and not mode.checking, "the step did not reach its metrics"
    in_window = [r for r in mode.records if r.phase == "forwards and losses"]
    assert not in_window, "host <-> device traffic between the forward passes and the losses:\n" + \
        "\n".join(str(r) for r in in_window[:20])
    moved_in = [r for r in mode.records if r.kind == "h2d"]
    assert moved_in and all(r.where.startswith("trainer/experience.py") for r in moved_in), moved_in
    gae_calls, loss_inputs = result["gae_calls"], result["loss_inputs"]
    assert gae_calls == [[True, True, True]], f"GAE on the device through the Triton path, once: {gae_calls}"
    names = [name for name, _, _ in loss_inputs]
    assert "actor_loss" in names and "critic_loss" in names
    assert all(on_device for _, on_device, _ in loss_inputs), loss_inputs
    assert result["metrics"]["reward/accuracy"] == pytest.approx(0.5)


def test_per_token_tensors_stay_on_the_device_from_forward_passes_to_losses(trainer, monkeypatch):
    mode = FakeCudaMode(CHECKED)
    assert_stays_on_the_device(mode, run_checked_rl_step(trainer, monkeypatch, mode))

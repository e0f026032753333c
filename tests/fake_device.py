"""A stand-in GPU for CPU tests: tensors marked as living on "cuda:0" while they compute on the CPU,
and a record of every transfer between that device and the host.

`FakeCudaMode` is a TorchFunctionMode that follows where each tensor would be in a GPU run:
- on the device: results of `.to(<cuda>)` / `.cuda()`, of factories with a CUDA `device=` (a
  string, a torch.device, or an ordinal as Megatron passes), of any op with a device input, and
  whatever the test marks (the engines' parameters);
- on the host: everything else (lists turned into tensors, factories without a device, `.cpu()`).
In the files listed in `checked` (the trainer's data path), device tensors report `device` cuda:0
and `is_cuda` True, so the code takes its GPU branches there, and the mode records:
- `d2h`: a device tensor copied to the host (`.cpu()`, `.to("cpu")`, `.numpy()`, `.tolist()`,
  `.item()`, `copy_` into a host tensor) with at least `min_dim` dimensions;
- `h2d`: a host tensor with at least `min_dim` dimensions copied to the device (`.to(cuda)`,
  `.cuda()`, `copy_` into a device tensor);
- `mixed`: an op mixing device tensors with host tensors of one or more dimensions, which on a
  GPU raises a device mismatch or copies implicitly.
Anywhere else (Megatron, torch internals, autograd) device tensors keep their real CPU device and
nothing is recorded; marks still propagate. Each record names the op and its caller (file:line).

With `real=True` (on a GPU) the mode only follows and records: a tensor is on the device when it
really is (`is_cuda`), nothing is marked or rewritten, and the same records are kept, so one test
body checks the data path with the stand-in on CPU and with the real device on a GPU.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

FAKE = torch.device("cuda", 0)


@dataclass
class Transfer:
    """One recorded event: kind ('d2h', 'h2d', 'mixed'), the op, its caller and the shapes."""

    kind: str
    op: str
    where: str
    shapes: list[tuple[int, ...]]
    phase: str

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.where} {self.shapes} ({self.phase})"


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _is_cpu(device: Any) -> bool:
    return (isinstance(device, torch.device) and device.type == "cpu") or device == "cpu"


def _is_device_arg(x: Any) -> bool:
    return isinstance(x, (torch.device, str)) or (isinstance(x, int) and not isinstance(x, bool))


_GETTERS = {torch.Tensor.device.__get__: "device", torch.Tensor.is_cuda.__get__: "is_cuda",
            torch.Tensor.is_cpu.__get__: "is_cpu"}


class FakeCudaMode(TorchFunctionMode):
    """See the module docstring. `phase` labels records (e.g. 'before forwards'); `checking=False`
    pauses recording (marks still propagate); `real`: follow a real GPU's tensors instead."""

    def __init__(self, checked: Iterable[str], min_dim: int = 2, real: bool = False) -> None:
        super().__init__()
        self.checked = tuple(checked)
        self.min_dim = min_dim
        self.real = real
        self.on_device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.records: list[Transfer] = []
        self.phase = "start"
        self.checking = True

    # ---- marks --------------------------------------------------------------------------------
    def mark(self, tensors: Iterable[torch.Tensor]) -> None:
        """Treat these tensors (e.g. the engines' parameters) as living on the device."""
        if self.real:
            return
        for t in tensors:
            self.on_device[t] = True

    def is_device(self, t: torch.Tensor) -> bool:
        """Whether `t` would be on the GPU (with `real`: is)."""
        if self.real:
            return t.is_cuda
        return t in self.on_device

    def _mark_out(self, out: Any) -> Any:
        if self.real:
            return out
        for t in _tensors(out):
            self.on_device[t] = True
        return out

    # ---- records ------------------------------------------------------------------------------
    def _caller(self) -> str | None:
        """file:line of the caller when it is one of the checked files, else None."""
        frame = sys._getframe(2)
        name = frame.f_code.co_filename.replace("\\", "/")
        return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.f_lineno}" \
            if any(name.endswith(c) for c in self.checked) else None

    def _record(self, kind: str, func: Callable, where: str | None, tensors: Iterable[torch.Tensor]) -> None:
        if self.checking and where is not None:
            self.records.append(Transfer(kind, getattr(func, "__name__", str(func)), where,
                                         [tuple(t.shape) for t in tensors], self.phase))

    # ---- the mode -----------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        where = self._caller()
        if func in _GETTERS:
            real = func(*args, **kwargs)
            if self.real or where is None or not self.is_device(args[0]):
                return real
            return {"device": FAKE, "is_cuda": True, "is_cpu": False}[_GETTERS[func]]
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs, where)
        if func in (torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item):
            src = args[0]
            if self.is_device(src) and (func is torch.Tensor.numpy or src.dim() >= self.min_dim):
                self._record("d2h", func, where, [src])
            return func(*args, **kwargs)
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if self.is_device(src) and not self.is_device(dst) and src.dim() >= self.min_dim:
                self._record("d2h", func, where, [src])
            if self.is_device(dst) and not self.is_device(src) and src.dim() >= self.min_dim:
                self._record("h2d", func, where, [src])
            return func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        device_in = [t for t in inputs if self.is_device(t)]
        host_in = [t for t in inputs if not self.is_device(t) and t.dim() >= 1]
        if device_in and host_in:
            self._record("mixed", func, where, host_in)
        device_kw = kwargs.get("device")
        if device_kw is not None and _is_cuda(device_kw) and not self.real:
            kwargs = dict(kwargs, device="cpu")
            return self._mark_out(func(*args, **kwargs))
        out = func(*args, **kwargs)
        return self._mark_out(out) if device_in else out

    def _move(self, func: Callable, args: tuple, kwargs: dict, where: str | None) -> Any:
        """.to / .cuda / .cpu: a transfer when the tensor changes sides (a copy, never an alias)."""
        if self.real:                                        # record, then move as asked
            self._move_stand_in(func, args, kwargs, where, record_only=True)
            return func(*args, **kwargs)
        return self._move_stand_in(func, args, kwargs, where)

    def _move_stand_in(self, func: Callable, args: tuple, kwargs: dict, where: str | None,
                       record_only: bool = False) -> Any:
        """The stand-in's move (or, with `record_only`, its records alone)."""
        src = args[0]
        if func is torch.Tensor.cuda:
            target: Any = FAKE
        elif func is torch.Tensor.cpu:
            target = torch.device("cpu")
        else:
            target = kwargs.get("device")
            rest = list(args[1:])
            if target is None and rest and isinstance(rest[0], torch.Tensor):
                target = FAKE if self.is_device(rest[0]) else torch.device("cpu")
                rest = [rest[0].dtype, *rest[1:]]
            elif target is None and rest and _is_device_arg(rest[0]):
                target, rest = rest[0], rest[1:]
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            args = (src, *rest)
        if target is None:                                   # dtype / memory-format only
            if record_only:
                return None
            out = func(*args, **kwargs)
            return self._mark_out(out) if self.is_device(src) else out
        plain = {k: v for k, v in kwargs.items() if k not in ("non_blocking", "memory_format", "copy")}
        dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), plain.get("dtype"))
        if _is_cuda(target):
            if self.is_device(src):
                return None if record_only else self._mark_out(src if dtype in (None, src.dtype) else src.to(dtype))
            if src.dim() >= self.min_dim:
                self._record("h2d", func, where, [src])
            return None if record_only else self._mark_out(src.to(dtype=dtype or src.dtype, copy=True))
        if _is_cpu(target):
            if not self.is_device(src):
                return None if record_only else (src if dtype in (None, src.dtype) else src.to(dtype))
            if src.dim() >= self.min_dim:
                self._record("d2h", func, where, [src])
            return None if record_only else src.to(dtype=dtype or src.dtype, copy=True)
        raise AssertionError(f"FakeCudaMode: unexpected target device {target!r}")

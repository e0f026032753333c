"""Rule-based verifier reward of VC-PPO (Yuan et al. 2025), §4.1 "Reward Modeling".

"When assigning the reward score, the verifier ignores the thinking part enclosed by the <think>
tokens and extracts only the answer part for evaluation. Correct answers are assigned a score of
1.0, while incorrect answers receive a score of -1.0."

The answer is extracted by :mod:`vcppo_megatron.rewards.extract` and compared with the ground
truth by math-verify (LaTeX / sympy equivalence: fractions, mixed numbers, intervals, sets,
matrices, thousands separators, percent, degrees, ...).

Time limits. math-verify's own timeouts use ``signal.alarm`` (whole seconds, main thread only),
so they are switched off and replaced by:

* a guard that rejects answers whose exact value would have more than ``_MAX_DIGITS`` digits
  (``9^{9^{9^9}}``): sympy computes those inside one C call that no signal can interrupt;
* a ``SIGALRM`` interval timer (sub-second resolution) around parse + compare when running in
  the main thread (``math_reward`` in the trainer process, and inside every pool worker);
* in :func:`batch_math_reward` with ``num_workers > 0``, a hard per-sample deadline enforced by
  killing the worker process (:mod:`vcppo_megatron.rewards.pool`). ``math_reward`` called from a
  non-main thread, where signals cannot be used, sends its comparison through a 1-worker pool.

Numeric comparison keeps math-verify's default of rounding floats to 6 decimals, so e.g.
``.0000672`` and ``.0000673`` compare equal.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence

from sympy import Basic, Float, Integer, MatrixBase, Rational, factorial
from sympy.core.add import Add
from sympy.core.mul import Mul
from sympy.core.power import Pow
import math_verify
from math_verify import ExprExtractionConfig, LatexExtractionConfig

from vcppo_megatron.rewards.extract import extract_answer, normalize_answer
from vcppo_megatron.rewards.pool import HardDeadlinePool, PoolUnavailableError

logger = logging.getLogger(__name__)

# We disable math-verify's signal.alarm timeouts on purpose (see the module docstring); mark its
# one-off "timeout is disabled" warning as already shown so it does not pollute every worker.
for _name in ("math_verify.parser", "math_verify.grader"):
    importlib.import_module(_name).TIMEOUT_WARNING_SHOWN = True

_EXTRACTION_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_MAX_DIGITS = 100_000  # exact values larger than 10**_MAX_DIGITS are never a correct answer
_MAX_DEPTH = 200
_RETRIGGER_S = 0.05  # the time-limit signal repeats at this period until the block is left
_HARD_DEADLINE_GRACE_S = 2.0  # pool deadline = timeout_s * 1.5 + grace (IPC, scheduling)


class _VerifyTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify cannot swallow it."""


# ------------------------------------------------------------------------------ time limit
def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise _VerifyTimeout in the main thread after `seconds` (no-op elsewhere or if <= 0)."""
    if not seconds or seconds <= 0 or not _in_main_thread():
        yield
        return

    armed = [True]

    def _raise(signum, frame):
        if armed[0]:
            raise _VerifyTimeout()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _raise)
    # The timer repeats every _RETRIGGER_S: code under sympy / math-verify may catch and swallow
    # the first _VerifyTimeout (a broad `except` in a C-level call path), so raise it again until
    # the block is left.
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds, _RETRIGGER_S)
    if 0 < outer_delay < seconds:  # someone else's timer (e.g. pytest-timeout) fires first
        signal.setitimer(signal.ITIMER_REAL, outer_delay, _RETRIGGER_S)
    try:
        yield
    finally:
        while True:  # a tick that lands here is absorbed, never skips the clean-up below
            try:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except _VerifyTimeout:
                continue
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer_delay > 0:  # re-arm the outer timer with what is left of it
            left = max(outer_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


# ------------------------------------------------------------------------------ size guard
def _log10_size(expr: object, depth: int = 0) -> float:
    """Rough upper estimate of the number of digits of expr's exact value (0 for symbols)."""
    if depth > _MAX_DEPTH:
        return math.inf
    if isinstance(expr, Integer):
        return int(expr).bit_length() * 0.30103
    if isinstance(expr, Rational):
        return max(expr.p.bit_length(), expr.q.bit_length()) * 0.30103
    if isinstance(expr, Float):
        return 0.0  # floats are evaluated by mpmath at fixed precision: always cheap
    if isinstance(expr, Pow):
        base = _log10_size(expr.base, depth + 1)
        exponent = _log10_size(expr.exp, depth + 1)
        if base == 0:
            return 0.0
        return math.inf if exponent > 300 else base * 10.0 ** exponent
    if isinstance(expr, factorial):
        digits = _log10_size(expr.args[0], depth + 1)
        return math.inf if digits > 300 else 10.0 ** digits * max(digits, 1.0)
    if isinstance(expr, MatrixBase):
        args = list(expr)
    elif isinstance(expr, Basic):
        args = list(expr.args)
    else:
        return 0.0
    sizes = [_log10_size(arg, depth + 1) for arg in args] or [0.0]
    if isinstance(expr, Mul):
        return sum(sizes)
    if isinstance(expr, Add):
        return max(sizes) + 1.0
    return max(sizes)


def _too_big(parsed: Sequence[object]) -> bool:
    return any(_log10_size(item) > _MAX_DIGITS for item in parsed)


# ------------------------------------------------------------------------------ comparison
def _parse(answer: str) -> list:
    """math-verify parse of one normalised answer (a sympy object and/or its string form)."""
    return math_verify.parse("\\boxed{" + answer + "}", extraction_config=_EXTRACTION_CONFIG,
                             parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    return tuple(_parse(gold))


def _equivalent(answer: str, ground_truth: str) -> bool:
    gold = _parse_gold(normalize_answer(ground_truth))
    pred = _parse(normalize_answer(answer))
    if not gold or not pred or _too_big(gold) or _too_big(pred):
        return False
    return bool(math_verify.verify(list(gold), pred, timeout_seconds=None))


def verify_answer(answer: str, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """True iff the extracted answer equals the ground truth; False on error or timeout."""
    try:
        with _alarm(timeout_s):
            return _equivalent(answer, ground_truth)
    except (Exception, _VerifyTimeout):  # noqa: BLE001 - garbage in, "wrong" out
        return False


# ------------------------------------------------------------------------------ worker pools
_POOLS: dict[int, HardDeadlinePool] = {}
_POOLS_LOCK = threading.Lock()


def _worker_init() -> None:
    """Pool worker start-up (runs after this module, hence sympy, is imported): quiet logs."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _get_pool(num_workers: int) -> HardDeadlinePool:
    with _POOLS_LOCK:
        pool = _POOLS.get(num_workers)
        if pool is None or pool.pid != os.getpid():  # none yet, or inherited through fork()
            pool = HardDeadlinePool(num_workers, initializer=_worker_init, preload=[__name__])
            _POOLS[num_workers] = pool
        return pool


def shutdown_reward_pools() -> None:
    """Stop the verifier worker processes (they are restarted on the next batch call)."""
    with _POOLS_LOCK:
        pools = [p for p in _POOLS.values() if p.pid == os.getpid()]
        _POOLS.clear()
    for pool in pools:
        with contextlib.suppress(Exception):
            pool.close()


atexit.register(shutdown_reward_pools)


def _verify_many(pairs: list[tuple[str, str]], timeout_s: float, num_workers: int) -> list[bool]:
    """verify_answer over pairs on a worker pool, with a hard per-pair deadline."""
    if timeout_s and timeout_s > 0:
        deadline = timeout_s * 1.5 + _HARD_DEADLINE_GRACE_S
    else:
        deadline = math.inf
    tasks = [(answer, gold, timeout_s) for answer, gold in pairs]
    try:
        return _get_pool(num_workers).map(verify_answer, tasks, deadline, default=False)
    except PoolUnavailableError:
        logger.warning("verifier pool unavailable; verifying in-process")
        return [verify_answer(*task) for task in tasks]


# ------------------------------------------------------------------------------ public API
def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def math_reward(response: str, ground_truth: str, *, correct_reward: float = 1.0,
                wrong_reward: float = -1.0, timeout_s: float = 5.0) -> float:
    """Score one response against its ground-truth answer: correct_reward or wrong_reward.

    Never raises; returns wrong_reward when there is no answer part (unclosed <think>), no
    extractable answer, an answer that does not match, or when `timeout_s` is exceeded
    (timeout_s <= 0 disables the limit). Safe to call from any thread.
    """
    try:
        answer, gold = extract_answer(response), _as_text(ground_truth)
        if answer is None or gold is None:
            return wrong_reward
        if _in_main_thread():
            correct = verify_answer(answer, gold, timeout_s)
        else:  # no signals here: a worker process enforces the time limit
            correct = _verify_many([(answer, gold)], timeout_s, num_workers=1)[0]
        return correct_reward if correct else wrong_reward
    except (Exception, _VerifyTimeout):  # noqa: BLE001 - never raise on model output
        return wrong_reward


def batch_math_reward(responses: Sequence[str], ground_truths: Sequence[str], *,
                      correct_reward: float = 1.0, wrong_reward: float = -1.0,
                      timeout_s: float = 5.0, num_workers: int = 2) -> list[float]:
    """Score a batch of responses (in order) with math_reward, over num_workers processes.

    Answers are extracted here; the sympy comparisons run on a persistent pool of
    `num_workers` forkserver/spawn processes (created on first use, reused, stopped by
    shutdown_reward_pools or at exit) with a hard per-sample deadline of 1.5 * timeout_s + 2 s.
    A sample that overruns it or crashes its worker scores wrong_reward. num_workers=0 scores
    in the calling process (signal time limit in the main thread). As with any spawn-style pool,
    a calling script needs the usual ``if __name__ == "__main__":`` guard.
    Raises ValueError only if the two lists differ in length.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if num_workers <= 0:
        return [math_reward(r, g, correct_reward=correct_reward, wrong_reward=wrong_reward,
                            timeout_s=timeout_s) for r, g in zip(responses, ground_truths)]
    rewards = [wrong_reward] * len(responses)
    # Extraction is cheap and done here; only the sympy comparisons go to the workers.
    todo: list[tuple[int, str, str]] = []
    for i, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
        try:
            answer, gold = extract_answer(response), _as_text(ground_truth)
        except Exception:  # noqa: BLE001
            continue
        if answer is not None and gold is not None:
            todo.append((i, answer, gold))
    if todo:
        verdicts = _verify_many([(a, g) for _, a, g in todo], timeout_s, num_workers)
        for (i, _, _), correct in zip(todo, verdicts):
            rewards[i] = correct_reward if correct else wrong_reward
    return rewards

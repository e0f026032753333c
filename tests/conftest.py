"""Shared test set-up: make tests/ importable (helpers, spawned workers); skip `gpu` without CUDA."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pin_absl_handler_to_real_stderr() -> None:
    """absl's log handler keeps the sys.stderr it was created under. Imported mid-test (megatron's
    hyper_comm_grid imports it), that is one of pytest's capture buffers; a later vLLM start runs
    logging.config.dictConfig, which closes every existing handler, and absl's close() closes a
    stream that is not the current sys.stderr: pytest's buffer, and the session dies with "I/O
    operation on closed file". Outside pytest the stream is the real stderr and is left open."""
    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


_pin_absl_handler_to_real_stderr()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

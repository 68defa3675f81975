"""One user turn through a tokenizer's chat template; shared by the needle prompts and rhead_jax.qa."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, List, Tuple

from rhead_jax.errors import UserError


def check_chat_template(tokenizer: Any) -> None:
    """Raise :class:`UserError` if ``tokenizer`` has no chat template (a base model's tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat=True but the tokenizer has no chat_template; use chat=False "
                        "(--config.model.chat=False) for base models")


def ids_from_chat_output(out: Any) -> List[int]:
    """The token ids of ``apply_chat_template(..., tokenize=True)``'s output, whatever its form
    (a list, a batch of one, an array, or a dict / BatchEncoding with ``input_ids``)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        if len(out) != 1:
            raise ValueError(f"apply_chat_template returned a batch of {len(out)} sequences, expected one")
        out = list(out[0])
    return [int(i) for i in out]


def chat_prompt(tokenizer: Any, content: str) -> Tuple[str, List[int]]:
    """(text, ids) of one user turn ``content`` through the chat template, generation prompt appended.

    The ids are the template's own tokenization (``tokenize=True``: the rendered text encoded
    without adding special tokens; the template writes BOS etc. itself). Raises
    :class:`UserError` if the tokenizer has no chat template.
    """
    check_chat_template(tokenizer)
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = ids_from_chat_output(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return text, ids

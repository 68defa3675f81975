"""Needle-in-a-haystack test construction: haystack/needle data, prompts, answer spans, grid, ROUGE.

Modules: ``haystack`` (loading the haystack text and the needle triples), ``tokens`` (what a
tokenizer contributes: period ids, the tokenized haystack, held by a caller-owned
:class:`TokenizerData`), ``chat`` (one user turn through a chat template, shared with
``rhead_jax.qa``), ``span`` (locating the answer span), ``prompts`` (building one instance),
``grid`` (the paper's grid of instances) and ``rouge`` (the keep test).
"""
from .chat import chat_prompt, check_chat_template
from .grid import build_grid, grid_keys, iter_grid, paper_depths, paper_lengths
from .haystack import (
    DATA_DIR,
    DEFAULT_HAYSTACK_PATH,
    DEFAULT_NEEDLES_PATH,
    SAN_FRANCISCO_NEEDLES_PATH,
    Needle,
    load_haystack,
    load_needles,
    san_francisco_needle,
)
from .prompts import (
    CHAT_USER_TEMPLATE,
    CONTEXT_BUFFER,
    LLAMA2_PERIOD_IDS,
    QUESTION_TEMPLATE,
    Instance,
    build_instance,
    check_length,
    instance_key,
)
from .rouge import KEEP_THRESHOLD, keep_test, rouge1_recall
from .span import SPAN_OVERLAP, NeedleNotFoundError, answer_token_ids, find_answer_span
from .tokens import TokenizedHaystack, TokenizerData, period_token_ids, tokenized_haystack

__all__ = [
    "CHAT_USER_TEMPLATE", "CONTEXT_BUFFER", "DATA_DIR", "DEFAULT_HAYSTACK_PATH", "DEFAULT_NEEDLES_PATH",
    "Instance", "KEEP_THRESHOLD", "LLAMA2_PERIOD_IDS", "Needle", "NeedleNotFoundError", "QUESTION_TEMPLATE",
    "SAN_FRANCISCO_NEEDLES_PATH", "SPAN_OVERLAP", "TokenizedHaystack", "TokenizerData", "answer_token_ids",
    "build_grid", "build_instance", "chat_prompt", "check_chat_template", "check_length", "find_answer_span",
    "grid_keys", "instance_key", "iter_grid", "keep_test", "load_haystack", "load_needles", "paper_depths",
    "paper_lengths", "period_token_ids", "rouge1_recall", "san_francisco_needle", "tokenized_haystack",
]

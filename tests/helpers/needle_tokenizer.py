"""The tokenizer of the needle tests: a small byte-level BPE trained on the bundled haystack,
wrapped in PreTrainedTokenizerFast with a BOS-adding post-processor and a chat template (no model,
no download). Import the fixtures into a test module with
``from tests.helpers.needle_tokenizer import haystack, needles, tok  # noqa: F401``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rhead_jax.needle import load_haystack, load_needles

REFERENCE_NEEDLES = Path(__file__).resolve().parents[3] / "shared/reference/needles.jsonl"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat_template=CHAT_TEMPLATE, text=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([load_haystack() if text is None else text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def enc(tok, text):
    """``text``'s ids without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_needles():
    """The original's needles (ORIGINAL.md section 1), or skip the test if they are not here."""
    if not REFERENCE_NEEDLES.is_file():
        pytest.skip(f"the original needles file is not available at {REFERENCE_NEEDLES}")
    return load_needles(REFERENCE_NEEDLES)


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def haystack():
    return load_haystack()


@pytest.fixture(scope="session")
def needles():
    return load_needles()

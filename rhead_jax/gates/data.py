"""Synthetic multi-passkey retrieval prompts from our haystack, one per training step.

DuoAttention's `MultiplePasskeyRetrievalDataset` (duo_attn/data.py), rebuilt on the tokens of
rhead_jax.needle (the bundled Areopagitica or config.haystack):

    <prefix> haystack ... \\n\\n<needle 1> <passkey 1>\\n\\n ... haystack ... \\n\\n<needle n> <passkey n>\\n\\n
    ... haystack <suffix> <question 1> <passkey 1>\\n\\n ... <question n> <passkey n>\\n\\n

A passkey is `passkey_words` random words of the NATO alphabet; the n = `passkeys` needles go at
sorted depths drawn without replacement from 1,000 points spread over 5%-95% of the haystack
tokens, as theirs. The loss is on the QA block (their `labels`): the hidden states of the
questions and the passkeys they ask for, where the model must have retrieved the passkeys.

Lengths: DuoAttention cycles shuffled epochs over 50 context lengths (haystack tokens) spread
over [min, max] and pads each prompt with more haystack to a multiple of 16. Here each of the 50
lengths L becomes a prompt WIDTH, round_up(L + the longest the needles and QA can tokenize to,
chunk), and the haystack fills whatever the needles and QA leave of it (at least L tokens): no
padding tokens, and one compiled train step per distinct width (`PasskeyData.widths`).
Everything is drawn from numpy.random.default_rng((seed, 0, step)) (the prompt) and
(seed, 1, epoch) (the order of the widths), so step s gets the same prompt in a resumed run as in
an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rhead_jax.needle.tokens import TokenizedHaystack, encode

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
         "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth")
MAX_PASSKEYS = len(ORDINALS)
PREFIX = "This is a very long story book: <book> "
SUFFIX = " </book>.\n\n"
SEPARATOR = "\n\n"
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: "
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
NUM_LENGTHS = 50        # DuoAttention's context_lengths_num_intervals
NUM_DEPTHS = 1000       # and depth_ratio_num_intervals
DEPTHS = (0.05, 0.95)   # min / max needle depth ratio


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt: tokens [T] int32, loss_mask [T] bool (the QA block), depths [n] (ratios)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    depths: np.ndarray

    @property
    def length(self) -> int:
        return len(self.tokens)


def prompt_widths(min_length: int, max_length: int, overhead: int, chunk: int) -> list[int]:
    """The prompt widths of a run: round_up(L + overhead, chunk) for DuoAttention's 50 context
    lengths L spread over [min_length, max_length], deduplicated."""
    return sorted({-(-(int(p) + overhead) // chunk) * chunk
                   for p in np.linspace(min_length, max_length, NUM_LENGTHS)})


class PasskeyData:
    """The prompt of every step, from a tokenizer, a haystack text and config.gates."""

    def __init__(self, tokenizer: Any, haystack_text: str, gates_config, *, chunk: int):
        g = gates_config
        self.tokenizer = tokenizer
        self.seed, self.n, self.words = int(g.seed), int(g.passkeys), int(g.passkey_words)
        enc = lambda s: encode(tokenizer, s, special=False)  # noqa: E731
        self.prefix = encode(tokenizer, PREFIX, special=True)
        self.suffix, self.sep = enc(SUFFIX), enc(SEPARATOR)
        self.needles = [enc(NEEDLE.format(ordinal=o)) for o in ORDINALS[:self.n]]
        self.questions = [enc(QUESTION.format(ordinal=o)) for o in ORDINALS[:self.n]]
        # a bound on a passkey's tokens: the longest first word, then the longest word after a space
        longest = max(len(enc(w)) for w in WORDS) + (self.words - 1) * max(len(enc(" " + w)) for w in WORDS)
        self.overhead = (len(self.prefix) + len(self.suffix)
                         + sum(len(nd) + len(q) + 3 * len(self.sep) + 2 * longest
                               for nd, q in zip(self.needles, self.questions)))
        self.widths = prompt_widths(g.min_length, g.max_length, self.overhead, chunk)
        self.haystack = TokenizedHaystack(tokenizer, haystack_text, 2 * max(self.widths), whole=True)

    def width_at(self, step: int) -> int:
        """The prompt width of `step`: shuffled epochs over `widths`, as DuoAttention's loader."""
        n = len(self.widths)
        order = np.random.default_rng((self.seed, 1, step // n)).permutation(n)
        return self.widths[order[step % n]]

    def example(self, step: int) -> Example:
        rng = np.random.default_rng((self.seed, 0, step))
        length = self.width_at(step)
        passkeys = [encode(self.tokenizer, " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), self.words)),
                           special=False) for _ in range(self.n)]
        qa: list[int] = []
        for q, pk in zip(self.questions, passkeys):
            qa += q + pk + self.sep
        needles = [self.sep + nd + pk + self.sep for nd, pk in zip(self.needles, passkeys)]
        n_hay = length - len(self.prefix) - len(self.suffix) - len(qa) - sum(map(len, needles))
        if n_hay < 1:  # the bound on the passkeys' tokens failed (a tokenizer that merges across words)
            raise RuntimeError(f"step {step}: passkeys took more tokens than bounded ({self.overhead})")
        hay_all = self.haystack.tokens
        start = int(rng.integers(0, len(hay_all) - n_hay + 1))
        hay = hay_all[start:start + n_hay].tolist()
        grid = np.linspace(*DEPTHS, NUM_DEPTHS)
        depths = np.sort(grid[rng.permutation(NUM_DEPTHS)[:self.n]])
        context, last = [], 0
        for d, nd in zip(depths, needles):
            at = int(n_hay * d)
            context += hay[last:at] + nd
            last = at
        context += hay[last:]
        head = self.prefix + context + self.suffix
        tokens = np.asarray(head + qa, np.int32)
        assert len(tokens) == length, (len(tokens), length)
        mask = np.zeros(length, bool)
        mask[len(head):] = True
        return Example(tokens=tokens, loss_mask=mask, depths=depths)

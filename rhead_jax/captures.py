"""What the copy score saw, kept per test (config.sweep.save_captures): the arrays of one batch's
npz file beside its results (rhead_jax.results_store, `ResultStore(arrays=KIND)`), and reading them back.

    arrays = pack(out_b, instances, tokenizer)     # one batch -> {name: array}, rows = tests
    store.write_arrays(b, arrays)                  # batches/batch_NNNNN.npz, before its results
    tests = read_workdir(workdir)                  # {test key: TestCapture}, validated

Per batch (B tests, N = the most decode steps of its rows, L layers, H query heads, k =
config.sweep.capture_top_k, C context positions):

  keys          [B] str       the tests' keys (results.jsonl's "key")
  num_tokens    [B] int32     decode steps of each row (its generated tokens, stop token included)
  tokens        [B, N] int32  the generated tokens, -1 past num_tokens
  token_text    [B, N] str    each generated token decoded on its own
  topk_index    [B, N, L, H, k] int16 (int32 past 32,767 positions)  each head's k most attended
                key positions at each step, best first (= prompt indices below prompt_len; position
                prompt_len + i holds generated token i), -1 past num_tokens
  topk_weight   [B, N, L, H, k] float16  their attention weights
  span          [B, 2] int32  the answer span [start, end) the score counts (Instance.span)
  needle_span   [B, 2] int32  the needle's tokens (Instance.needle_span; the answer span when unknown)
  prompt_len    [B] int32
  window        [B, 2] int32  the prompt range shown around the needle: the needle and the answer
                span, CONTEXT_TOKENS either side
  context_pos   [B, C] int32  the window's positions, then every other prompt position some head
                attended to (in its top k) at some step, ascending, -1 padded
  context_ids   [B, C] int32  the prompt tokens there; context_text [B, C] str: each decoded on its own

The copy events are recomputed from these with rhead_jax.scoring's own function (`copy_events`):
the answer span lies inside the window, so the tokens there are all the rule reads.
"""
from __future__ import annotations

import dataclasses
import io as _bytes_io
from typing import Any, Sequence

import numpy as np

from rhead_jax import io, scoring
from rhead_jax.errors import UserError
from rhead_jax.results_store import BatchFileError, ResultStore

FORMAT = "rhead_jax.captures/1"
CONTEXT_TOKENS = 32   # prompt tokens kept either side of the needle
FLAG = "--config.sweep.save_captures=True"


def kind(top_k: int) -> str:
    """The arrays kind of a sweep's batch files (ResultStore(arrays=...)): format and k."""
    return f"{FORMAT} top_k={top_k}"


def _token_texts(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) if i >= 0 else "" for i in ids]


def pack(out_b, instances: Sequence, tokenizer, *, context_tokens: int = CONTEXT_TOKENS) -> dict[str, np.ndarray]:
    """The capture arrays of one generated batch (engine.BatchOutput `out_b`, its `instances`)."""
    B = len(instances)
    n_tok = np.asarray(out_b.num_tokens[:B], np.int32)
    N = max(int(n_tok.max()), 1)
    live = np.arange(N)[None, :] < n_tok[:, None]                        # [B, N]
    tokens = np.where(live, np.asarray(out_b.tokens)[:B, :N], -1).astype(np.int32)
    idx = np.asarray(out_b.topk_index)[:B, :N]
    w = np.asarray(out_b.topk_weight)[:B, :N]
    idx = np.where(live[:, :, None, None, None], idx, -1)
    w = np.where(live[:, :, None, None, None], w, 0)
    idx_dtype = np.int16 if idx.max(initial=0) < np.iinfo(np.int16).max else np.int32
    span = np.array([i.span for i in instances], np.int32)
    needle = np.array([i.needle_span if i.needle_span is not None else i.span for i in instances], np.int32)
    plen = np.array([i.num_prompt_tokens for i in instances], np.int32)
    window = np.stack([np.maximum(np.minimum(span[:, 0], needle[:, 0]) - context_tokens, 0),
                       np.minimum(np.maximum(span[:, 1], needle[:, 1]) + context_tokens, plen)], 1).astype(np.int32)
    positions = []
    for b, inst in enumerate(instances):
        seen = idx[b, :n_tok[b]].ravel()
        seen = seen[(seen >= 0) & (seen < plen[b])]
        positions.append(np.union1d(np.arange(window[b, 0], window[b, 1]), seen).astype(np.int32))
    C = max(len(p) for p in positions)
    context_pos = np.full((B, C), -1, np.int32)
    context_ids = np.full((B, C), -1, np.int32)
    texts, gen_texts = [], []
    for b, inst in enumerate(instances):
        p = positions[b]
        ids = np.asarray(inst.prompt_ids)[p]
        context_pos[b, :len(p)] = p
        context_ids[b, :len(p)] = ids
        texts.append(_token_texts(tokenizer, ids) + [""] * (C - len(p)))
        gen_texts.append(_token_texts(tokenizer, tokens[b]))
    return {"keys": np.array([i.key for i in instances], str), "num_tokens": n_tok, "tokens": tokens,
            "token_text": np.array(gen_texts, str).reshape(B, N), "topk_index": idx.astype(idx_dtype),
            "topk_weight": w.astype(np.float16), "span": span, "needle_span": needle, "prompt_len": plen,
            "window": window, "context_pos": context_pos, "context_ids": context_ids,
            "context_text": np.array(texts, str).reshape(B, C)}


@dataclasses.dataclass(frozen=True)
class TestCapture:
    """One test's captures (the module docstring's arrays, its row, trimmed): topk_index / topk_weight
    [n, L, H, k], tokens / token_text [n], context_pos / context_ids / context_text [c]."""

    key: str
    tokens: np.ndarray
    token_text: list[str]
    topk_index: np.ndarray
    topk_weight: np.ndarray
    span: tuple[int, int]
    needle_span: tuple[int, int]
    prompt_len: int
    window: tuple[int, int]
    context_pos: np.ndarray
    context_ids: np.ndarray
    context_text: list[str]

    def copy_events(self) -> np.ndarray:
        """[n, L, H] bool: rhead_jax.scoring.copy_events on this test (the events its score counts)."""
        prompt = np.full(self.prompt_len, -2, np.int32)   # -2 matches no generated token
        prompt[self.context_pos] = self.context_ids
        ev = scoring.copy_events(self.topk_index[None].astype(np.int32), self.tokens[None], prompt[None],
                                 np.array([self.span[0]]), np.array([self.span[1]]))
        return np.asarray(ev[0])


def unpack(arrays: dict[str, np.ndarray]) -> list[TestCapture]:
    """The TestCaptures of one batch's arrays."""
    out = []
    for b, key in enumerate(arrays["keys"]):
        n = int(arrays["num_tokens"][b])
        c = int((arrays["context_pos"][b] >= 0).sum())
        out.append(TestCapture(
            key=str(key), tokens=arrays["tokens"][b, :n], token_text=[str(t) for t in arrays["token_text"][b, :n]],
            topk_index=arrays["topk_index"][b, :n].astype(np.int32), topk_weight=arrays["topk_weight"][b, :n],
            span=tuple(int(x) for x in arrays["span"][b]), needle_span=tuple(int(x) for x in arrays["needle_span"][b]),
            prompt_len=int(arrays["prompt_len"][b]), window=tuple(int(x) for x in arrays["window"][b]),
            context_pos=arrays["context_pos"][b, :c], context_ids=arrays["context_ids"][b, :c],
            context_text=[str(t) for t in arrays["context_text"][b, :c]]))
    return out


def read_workdir(workdir: str) -> dict[str, TestCapture]:
    """{test key: TestCapture} of every batch of a sweep's workdir (local or gs://), each file
    validated (header, pin, checksum); a sweep without captures is refused with a UserError naming the flag."""
    root = io.as_path(workdir)
    if not (root / "sweep_config.json").exists():
        raise UserError(f"{workdir} is not a sweep's workdir (no sweep_config.json); give the --workdir of "
                        "`python -m rhead_jax.sweep`")
    store = ResultStore.reader(str(workdir))
    files = sorted((root / "batches").glob("batch_*.json")) if (root / "batches").exists() else []
    out: dict[str, TestCapture] = {}
    missing = []
    for f in files:
        b = int(f.name[len("batch_"):-len(".json")])
        if not store.arrays_path(b).exists():
            missing.append(b)
            continue
        try:
            results = store.read(b)
            arrays = store.read_arrays(b)
        except BatchFileError as e:
            raise UserError(f"{e}; run the sweep again with the same --workdir and {FLAG} to redo it") from None
        caps = unpack(arrays)
        if [c.key for c in caps] != [r["key"] for r in results]:
            raise UserError(f"{store.arrays_path(b)} holds the captures of other tests than its batch file; run the "
                            f"sweep again with the same --workdir and {FLAG}")
        out.update((c.key, c) for c in caps)
    if missing or not files:
        raise UserError(f"the sweep in {workdir} kept no captures ({len(missing)} of {len(files)} batches lack "
                        f"batches/batch_NNNNN.npz); run it again with {FLAG} and the same --workdir (it redoes "
                        "only what lacks them)")
    return out


def size_per_test(workdir: str) -> dict[str, Any]:
    """Bytes of the captures on disk: {"bytes", "tests", "bytes_per_test", "files"}."""
    files = sorted((io.as_path(workdir) / "batches").glob("batch_*.npz"))
    tests = total = 0
    for f in files:
        data = f.read_bytes()
        total += len(data)
        with np.load(_bytes_io.BytesIO(data), allow_pickle=False) as z:
            tests += len(z["keys"])
    return {"bytes": total, "tests": tests, "bytes_per_test": total / max(tests, 1), "files": len(files)}

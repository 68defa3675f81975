"""What an ablation measures with heads masked, on the engine: the needle grid or a QA / CoT file.

Tasks (`config.ablation.task`): "niah" (the needle grid of config.sweep; accuracy = mean ROUGE-1
recall of the answer span, 0-1), "qa:PATH" (extractive QA, accuracy = mean SQuAD F1; EM reported
too) or "cot:PATH" (math word problems with chain-of-thought; accuracy = share solved), see
rhead_jax.qa. Nothing here scores heads, so generation runs without attention capture.

A task has `batches` (lists of indices), `run(b, prefill_mask, decode_mask, label)` -> the batch's
result dicts (written by the engine's ResultStore), `records(results)` -> per-instance records with
a `score`, and `summarize(records)`.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import numpy as np

from rhead_jax import qa
from rhead_jax.ablation.taxonomy import CATEGORIES, classify_response, haystack_ngrams
from rhead_jax.batches import grid_batches
from rhead_jax.engine import Engine, stop_tokens
from rhead_jax.errors import UserError
from rhead_jax.needle.rouge import keep_test, rouge1_recall

TASKS = ("niah", "qa", "cot")


def parse_task(text: str) -> tuple[str, str | None]:
    """"niah" -> ("niah", None); "qa:PATH" / "cot:PATH" -> (kind, PATH)."""
    text = str(text).strip()
    if text == "niah":
        return "niah", None
    kind, sep, path = text.partition(":")
    if kind in ("qa", "cot") and sep and path.strip():
        return kind, path.strip()
    raise UserError(f"unknown task {text!r}; use niah, qa:PATH (JSONL of context/question/answer) or "
                    "cot:PATH (JSONL of question/answer)")


class NiahTask:
    """The needle grid of config.sweep: the engine's plan, batches and shared prefix."""

    kind = "niah"
    tag = "niah"

    def __init__(self, engine: Engine):
        self.engine, self.config = engine, engine.config
        self.instances = engine.plan_needles()
        self.batch_size, self.batches = grid_batches(self.instances, self.config.sweep.batch_size)
        self.spec = engine.spec(capture=False)
        self._ngrams: dict[str, frozenset] = {}

    def pinned(self) -> dict:
        c = self.config
        return {"needles": c.needles, "haystack": c.haystack, "sweep": c.sweep.to_dict(),
                "batch_size_used": self.batch_size}

    def prompts(self) -> list[list[int]]:
        """Every instance's prompt ids (the mean ablations' calibration draws from them)."""
        return [i.prompt_ids.tolist() for i in self.instances]

    def run(self, b: int, prefill_mask, decode_mask, label: str) -> list[dict]:
        batch = [self.instances[i] for i in self.batches[b]]
        shared = self.engine.shared_prefix(self.instances, self.spec, prefill_mask, label=label)
        out = self.engine.generate([i.prompt_ids for i in batch], self.spec, batch_size=self.batch_size,
                                   shared=shared, keys=[i.key for i in batch], prefill_mask=prefill_mask,
                                   decode_mask=decode_mask)
        results = []
        for b, inst in enumerate(batch):
            generated = out.generated(b)
            response = self.engine.decode(generated)
            recall = rouge1_recall(inst.answer, response)
            results.append({
                "key": inst.key, "length": inst.length, "depth": inst.depth, "needle_index": inst.needle_index,
                "prompt_tokens": inst.num_prompt_tokens, "span": [int(inst.span[0]), int(inst.span[1])],
                "shared_prefix_tokens": int(out.starts[b]), "generated": generated, "response": response,
                "rouge1_recall": recall, "kept": keep_test(recall)})
        return results

    def _haystack(self, key: str) -> frozenset:
        if key not in self._ngrams:
            inst = next(i for i in self.instances if i.key == key)
            ids = np.asarray(inst.context_ids)
            a, b = inst.needle_pos, inst.needle_pos + len(inst.needle_ids)
            tok = self.engine.tokenizer
            segs = [tok.decode(ids[:a].tolist(), skip_special_tokens=True),
                    tok.decode(ids[b:].tolist(), skip_special_tokens=True)]
            self._ngrams[key] = haystack_ngrams(segs, self.config.ablation.extraction_ngram)
        return self._ngrams[key]

    def records(self, results: Sequence[dict]) -> list[dict]:
        by_key = {i.key: i for i in self.instances}
        out = []
        for r in results:
            inst = by_key[r["key"]]
            tax = classify_response(r["response"], inst.answer, haystack=self._haystack(r["key"]),
                                    recall=r["rouge1_recall"], ngram=self.config.ablation.extraction_ngram)
            out.append({"key": r["key"], "length": r["length"], "depth": r["depth"],
                        "needle_index": r["needle_index"], "response": r["response"],
                        "generated": r["generated"], "rouge1_recall": r["rouge1_recall"],
                        "score": r["rouge1_recall"], **tax})
        return out

    def summarize(self, records: Sequence[dict]) -> dict:
        cells = collections.defaultdict(list)
        for r in records:
            cells[(r["length"], r["depth"])].append(r["score"])
        cats = collections.Counter(r["category"] for r in records)
        return {"tests": len(records),
                "accuracy": float(np.mean([r["score"] for r in records])) if records else 0.0,
                "accuracy_by_cell": [{"length": L, "depth": d, "accuracy": float(np.mean(v)), "tests": len(v)}
                                     for (L, d), v in sorted(cells.items())],
                "metrics": {"rouge1_recall": float(np.mean([r["score"] for r in records])) if records else 0.0},
                "categories": {c: cats.get(c, 0) for c in CATEGORIES}}


class TextTask:
    """An extractive-QA or chain-of-thought task file (rhead_jax.qa), generated with heads masked."""

    def __init__(self, engine: Engine, kind: str, path: str):
        self.engine, self.config, self.kind, self.path = engine, engine.config, kind, path
        self.items = qa.load_tasks(path, kind)
        tok = engine.tokenizer
        self.prompt_ids = [qa.build_prompt_ids(tok, it, kind, chat=self.config.model.chat) for it in self.items]
        a = self.config.ablation
        n_new = a.qa_max_new_tokens if kind == "qa" else a.cot_max_new_tokens
        limit = engine.cfg.max_position_embeddings
        for i, p in enumerate(self.prompt_ids):
            if len(p) + n_new > limit:
                raise UserError(f"{path}: item {i} has a prompt of {len(p)} tokens; with {n_new} new tokens it "
                                f"exceeds the model's max_position_embeddings={limit}")
        if kind == "qa":
            stops = stop_tokens(tok, faithful=False)
        else:
            stops = (int(tok.eos_token_id),) if tok.eos_token_id is not None else ()
        self.spec = engine.spec(capture=False, max_new_tokens=n_new, stops=stops)
        self.batch_size = min(self.config.sweep.batch_size, len(self.items))
        self.batches = [list(range(i, min(i + self.batch_size, len(self.items))))
                        for i in range(0, len(self.items), self.batch_size)]

    @property
    def tag(self) -> str:
        return f"{self.kind}-{Path(self.path).stem}"

    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self.prompt_ids]

    def pinned(self) -> dict:
        return {"task_file": str(self.path), "max_new_tokens": self.spec.max_new_tokens,
                "sweep": self.config.sweep.to_dict(), "batch_size_used": self.batch_size}

    def run(self, b: int, prefill_mask, decode_mask, label: str) -> list[dict]:
        idx = self.batches[b]
        out = self.engine.generate([self.prompt_ids[i] for i in idx], self.spec, batch_size=self.batch_size,
                                   prefill_mask=prefill_mask, decode_mask=decode_mask)
        results = []
        for row, i in enumerate(idx):
            generated = out.generated(row)
            results.append({"key": f"item{i:04d}", "index": i, "prompt_tokens": len(self.prompt_ids[i]),
                            "generated": generated, "response": self.engine.decode(generated)})
        return results

    def records(self, results: Sequence[dict]) -> list[dict]:
        out = []
        for r in results:
            item = self.items[r["index"]]
            m = qa.score_response(self.kind, r["response"], item)
            out.append({"key": r["key"], "index": r["index"], "question": item["question"],
                        "answer": item["answer"], "response": r["response"],
                        "generated": r["generated"], **m, "score": qa.item_accuracy(self.kind, m)})
        return out

    def summarize(self, records: Sequence[dict]) -> dict:
        return {"tests": len(records),
                "accuracy": float(np.mean([r["score"] for r in records])) if records else 0.0,
                "metrics": qa.aggregate(self.kind, records)}


def make_task(engine: Engine):
    kind, path = parse_task(engine.config.ablation.task)
    return NiahTask(engine) if kind == "niah" else TextTask(engine, kind, path)

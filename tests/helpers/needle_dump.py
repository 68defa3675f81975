"""Dump every needle-grid instance's token ids (and QA prompt ids) to JSON, to check refactors.

    python -m tests.helpers.needle_dump OUT.json [--tokenizers DIR]

Builds the grid lengths (500, 1000, 2000) x depths (0, 50, 100) x the bundled needles (plus the
San Francisco needle), for chat=True/False and faithful=True/False, with three tokenizers:
SmolLM2's real one (the converted default model, $RHEAD_JAX_CACHE), and two tiny ones trained
here on the bundled haystack and saved under DIR on first use (so that every later run loads the
very same files): a byte-level BPE that adds BOS (the needle tests') and a Llama-2-style one
(Metaspace "▁" pieces, BOS, [INST] chat template). Run it before and after a change and compare
the two files with `cmp`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

LENGTHS = (500, 1000, 2000)
DEPTHS = (0, 50, 100)
LLAMA_CHAT = ("{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}")


def _byte_bpe(text):
    from tests.helpers.needle_tokenizer import make_tokenizer

    return make_tokenizer(text=text)


def _llama_like(text):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list("▁[]/<>?.,:;'\"!-()0123456789"))
    tok.train_from_iterator([text.replace(" ", "▁")], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA_CHAT
    return fast


def tokenizers(directory: Path):
    from transformers import AutoTokenizer

    from rhead_jax.needle import load_haystack

    cache = Path(os.environ.get("RHEAD_JAX_CACHE", Path.home() / ".cache" / "rhead_jax"))
    out = {"smollm2": AutoTokenizer.from_pretrained(cache / "SmolLM2-135M-Instruct")}
    for name, make in (("tiny_byte_bpe", _byte_bpe), ("tiny_llama", _llama_like)):
        d = directory / name
        if not (d / "tokenizer.json").is_file():
            make(load_haystack()).save_pretrained(d)
        out[name] = AutoTokenizer.from_pretrained(d)
    return out


def dump(directory: Path) -> dict:
    from rhead_jax import qa
    from rhead_jax.needle import build_grid, load_haystack, load_needles, san_francisco_needle

    haystack = load_haystack()
    needles = load_needles() + [san_francisco_needle()]
    result = {}
    for tname, tok in tokenizers(directory).items():
        for chat in (False, True):
            for faithful in (False, True):
                grid = build_grid(tok, haystack, needles, LENGTHS, DEPTHS, chat=chat, faithful=faithful)
                result[f"{tname}/chat={chat}/faithful={faithful}"] = {
                    i.key: {"prompt_ids": i.prompt_ids.tolist(), "span": list(i.span), "needle_pos": i.needle_pos,
                            "context_ids": i.context_ids.tolist(), "answer_ids": list(i.answer_ids),
                            "prompt_text_sha1": hashlib.sha1(i.prompt_text.encode()).hexdigest()}
                    for i in grid}
            for kind, path in (("qa", qa.QA_TASKS_PATH), ("cot", qa.COT_TASKS_PATH)):
                items = qa.load_tasks(path, kind)
                result[f"{tname}/qa/{kind}/chat={chat}"] = [qa.build_prompt_ids(tok, it, kind, chat=chat)
                                                           for it in items]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizers", default="/tmp/needle_dump_tokenizers")
    a = ap.parse_args()
    res = dump(Path(a.tokenizers))
    Path(a.out).write_text(json.dumps(res, sort_keys=True))
    print(f"{sum(len(v) for v in res.values())} entries in {len(res)} groups -> {a.out}")


if __name__ == "__main__":
    main()

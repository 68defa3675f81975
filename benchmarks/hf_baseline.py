"""A straightforward HF-transformers (PyTorch) implementation of the ORIGINAL detection method.

ORIGINAL.md sections 4-5, with the structure of the paper's `retrieval_head_detection.py`:
batch 1, one instance at a time; one prefill forward over every prompt token but the last
(`use_cache=True`, the last position's logits only: `logits_to_keep=1`); then a greedy loop of
at most `max_new_tokens` steps, each feeding ONE token with `past_key_values` and
`output_attentions=True`; per step, for every layer, the top-1 key of
the newest query's attention row of each head (`topk(1)`, as the original; vectorized over the
heads of a layer) and the copy test in Python loops (`+= 1 / n`, a Python float sum starting at
int 0, as the original). It stops after a step whose token is in `stop_tokens` (the same set our
GenerateSpec uses; that step's copy test still counts), except a token of `leading` (default mode:
newline tokens) before the first visible token (rhead_jax.plan.ends_test).

The prefill's attention (`--prefill_attn`): the original prefills with FlashAttention-2 and runs
only the decode steps with eager attention, which it needs for `output_attentions`. On CPU the
stand-in for flash-attn is PyTorch's fused SDPA, so the default is the original's design as it
runs: the prefill forward under `attn_implementation="sdpa"`, the decode steps under "eager"
(`set_attn_implementation` switches the loaded model between them; the weights are shared).
`--prefill_attn=eager` runs the prefill eagerly too (the slower all-eager variant).

As a command it is the baseline process of benchmarks.sweep_vs_original: the same config files
and overrides as `python -m rhead_jax.sweep`, the same instances (rhead_jax.plan: tokenizer only,
no jax), and the sweep's head_scores.json / results.jsonl formats:

    python -m benchmarks.hf_baseline --config smollm2_135m.py --workdir /tmp/hf [--torch_threads N]
    python -m benchmarks.hf_baseline --config smollm2_135m.py --workdir /tmp/hf --prefill_attn=eager
"""
from __future__ import annotations

import json
import time
from typing import Sequence

from absl import flags, logging

from rhead_jax import cli


def load_hf_model(directory, *, dtype: str = "float32", device: str = "cpu"):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True)
    model.to(device)
    model.eval()
    return model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def retrieval_calculate(attentions, retrieval_score, token: int, prompt_ids: Sequence[int],
                        start: int, end: int) -> None:
    """The original's copy test for one decode step (top-1), in place on retrieval_score[l][h]."""
    n = end - start
    for layer_idx in range(len(attentions)):
        # [1, H, 1, keys] -> newest query's row per head; top-1 like the original's .topk(1)
        _, idx = attentions[layer_idx][0, :, -1].topk(1)
        idx = idx[:, 0].tolist()
        row = retrieval_score[layer_idx]
        for head_idx in range(len(idx)):
            i = idx[head_idx]
            if start <= i < end and token == prompt_ids[i]:
                row[head_idx] += 1 / n


PREFILL_ATTN = ("sdpa", "eager")


def run_instance(model, tokenizer, inst, *, max_new_tokens: int, stop_tokens: Sequence[int],
                 prefill_attn: str = "sdpa", leading: Sequence[int] = ()) -> dict:
    """Prefill (attention `prefill_attn`, the last position's logits only) + greedy decode (eager
    attention, with attentions) + copy test + ROUGE gate for one Instance; times each phase."""
    import torch

    from rhead_jax.needle.rouge import keep_test, rouge1_recall
    from rhead_jax.plan import ends_test

    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    prompt_ids = [int(t) for t in inst.prompt_ids]
    start, end = int(inst.span[0]), int(inst.span[1])
    stops, lead, seen = set(int(s) for s in stop_tokens), set(int(s) for s in leading), False
    score = [[0 for _ in range(H)] for _ in range(L)]
    generated: list[int] = []
    t_decode = t_score = 0.0
    device = model.device
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        t0 = time.perf_counter()
        model.set_attn_implementation(prefill_attn)
        out = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, return_dict=True)
        past = out.past_key_values
        model.set_attn_implementation("eager")   # output_attentions needs the eager path
        _sync(device)
        t_prefill = time.perf_counter() - t0
        inp = ids[:, -1]
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True,
                        output_attentions=True, return_dict=True)
            past = out.past_key_values
            inp = out.logits[0, -1].argmax()
            token = int(inp.item())
            t1 = time.perf_counter()
            generated.append(token)
            retrieval_calculate(out.attentions, score, token, prompt_ids, start, end)
            t2 = time.perf_counter()
            t_decode += t1 - t0
            t_score += t2 - t1
            stop, seen = ends_test(token, seen, stops, lead)
            if stop:
                break
        del past, out
    t0 = time.perf_counter()
    response = tokenizer.decode(generated, skip_special_tokens=True).strip()
    recall = rouge1_recall(inst.answer, response)
    kept = keep_test(recall)
    t_score += time.perf_counter() - t0
    return {"key": inst.key, "length": inst.length, "depth": inst.depth, "needle_index": inst.needle_index,
            "prompt_tokens": len(prompt_ids), "span": [start, end], "generated": generated,
            "response": response, "rouge1_recall": recall, "kept": kept, "scores": score,
            "time_prefill_s": t_prefill, "time_decode_s": t_decode, "time_score_s": t_score,
            "steps": len(generated)}


def thread_probe(model, inst, threads: int, steps: int = 5) -> dict:
    """Prefill + `steps` decode steps (with attentions) of one instance under `threads` torch
    threads; the caller restores its thread count. On a loaded machine OpenMP's barriers make
    multi-threaded torch much slower than one thread, which this exposes."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ids = torch.tensor([[int(t) for t in inst.prompt_ids]], dtype=torch.long)
            t0 = time.perf_counter()
            out = model(input_ids=ids[:, :-1], use_cache=True, return_dict=True)
            prefill_s = time.perf_counter() - t0
            past, inp = out.past_key_values, ids[:, -1]
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True,
                            output_attentions=True, return_dict=True)
                past = out.past_key_values
                inp = out.logits[0, -1].argmax()
            step_s = (time.perf_counter() - t0) / steps
    finally:
        torch.set_num_threads(old)
    return {"threads": threads, "prefill_s": prefill_s, "step_s": step_s, "prompt_tokens": ids.shape[1]}


# ----------------------------------------------------------------------------------- the command
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import torch
    import transformers
    from tqdm.auto import tqdm

    from rhead_jax import io
    from rhead_jax.checkpoints import resolve_model_dir
    from rhead_jax.plan import leading_stop_tokens, plan_needles, stop_tokens

    config = cli.get_config()
    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    t0 = time.time()
    directory = resolve_model_dir(config.model.path)
    model = load_hf_model(directory, dtype=FLAGS.dtype, device=FLAGS.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    instances = plan_needles(config, tokenizer, model.config.max_position_embeddings)
    stops = stop_tokens(tokenizer, faithful=config.sweep.faithful)
    leading = leading_stop_tokens(tokenizer, faithful=config.sweep.faithful)
    t_plan = time.time() - t0
    results = [run_instance(model, tokenizer, inst, max_new_tokens=config.sweep.max_new_tokens, stop_tokens=stops,
                            prefill_attn=FLAGS.prefill_attn, leading=leading)
               for inst in tqdm(instances, desc=f"HF baseline ({FLAGS.prefill_attn} prefill, eager decode)",
                                unit="test")]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    kept = [r for r in results if r["kept"]]
    head_scores = {f"{l}-{h}": [r["scores"][l][h] for r in kept] for l in range(L) for h in range(H)}
    root = io.as_path(FLAGS.workdir)
    io.atomic_write_json(root / "head_scores.json", head_scores)
    io.atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    if FLAGS.device.startswith("cuda"):   # benchmarks.gpu_paper_shape reads it
        io.atomic_write_json(root / "gpu_peak.json", {"peak_bytes": torch.cuda.max_memory_allocated(),
                                                      "device": torch.cuda.get_device_name()})
    logging.info("baseline (%s prefill, eager decode): %d tests in %.1fs (start-up and planning %.1fs; prefill "
                 "%.1fs, decode %.1fs, copy test %.1fs; %d torch threads)", FLAGS.prefill_attn, len(results),
                 time.time() - t0, t_plan, sum(r["time_prefill_s"] for r in results),
                 sum(r["time_decode_s"] for r in results), sum(r["time_score_s"] for r in results),
                 torch.get_num_threads())


if __name__ == "__main__":
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Where head_scores.json and results.jsonl go.", required=True)
    flags.DEFINE_integer("torch_threads", 0, "torch threads (0: torch's default, all cores).")
    flags.DEFINE_enum("prefill_attn", "sdpa", PREFILL_ATTN, "The prefill forward's attention: sdpa (the original's "
                      "design, flash-attn's CPU stand-in) or eager; decode steps are always eager.")
    flags.DEFINE_string("device", "cpu", "torch device: cpu, or cuda on a GPU (benchmarks.gpu_paper_shape).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The model's weights and activations.")
    cli.run(main)

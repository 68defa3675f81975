"""The one configuration schema of every command: each knob has one home, one default and a comment.

Files in configs/ (one per model, data only) start from `default_config()` and set values; every
command (sweep, ablate, the dry run, the benchmarks) reads the same schema through
`rhead_jax.cli`, and `validate()` refuses keys that are not in it, listing the valid ones.

A bare config name (`--config yi34b.py`, `--config yi34b`) is looked up in the configs shipped with
the package (`rhead_jax.configs`, the repository's configs/ folder installed as package data), so
it resolves in a checkout and after `pip install` alike.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import ml_collections

from rhead_jax.errors import UserError
from rhead_jax.needle.grid import paper_depths, paper_lengths

RETRIEVAL_THRESHOLD = 0.1   # a head whose mean score exceeds this is a retrieval head (the paper)
MASK_MODES = ("zero", "uniform", "mean_query", "mean_output")
MASK_PHASES = ("all", "decode")
DTYPES = ("float32", "bfloat16")
EXTRA_SCORES = ("mass", "query", "logit", "dla", "spatial")   # config.sweep.extra_scores (rhead_jax.detection)
# the sections a detection sweep's results depend on: pinned in its workdir (sweep_config.json)
SWEEP_SECTIONS = ("haystack", "mesh", "model", "needles", "sweep")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        path="default",      # HF checkpoint dir, a .gguf file, "default" (embedded SmolLM2-135M-Instruct) or "gemma3-270m"
        dtype="float32",     # "float32" or "bfloat16" params/activations; softmax is always fp32
        chat=True,           # wrap prompts in the tokenizer's chat template (instruct/chat models)
        name="",             # label used in logs and summaries; "" = the checkpoint dir name
    ))
    c.compile_cache = True   # JAX's persistent compilation cache in $RHEAD_JAX_CACHE/jax_compilation_cache:
                             # a second sweep, an ablation after a sweep, a resumed sweep reuse programs
    c.needles = ""           # JSONL of {needle, question, real_needle}; "" = the bundled default set
    c.haystack = ""          # a .txt file or a directory of .txt files; "" = bundled Areopagitica
    c.sweep = ml_collections.ConfigDict(dict(
        # tuples: config_flags overrides them from the command line, --config.sweep.lengths="(500,1000)"
        lengths=(500, 1000, 2000),   # context lengths in tokens
        depths=(0, 50, 100),         # needle depths in percent (0-100)
        faithful=False,              # reproduce every detection QUIRK of ORIGINAL.md
        max_new_tokens=50,           # decode-step cap (the original's 50)
        batch_size=8,                # instances of one length decoded together (the data axis)
        batch_kv_mib=0.0,            # the most KV cache one batch holds (MiB; 0: no limit): a length whose
                                     # rows need more decodes fewer at once (rhead_jax.engine.Engine.batch_sizes)
        share_prefix=True,           # prefill the common haystack prefix once per grid
        prefix_branches=0,           # and up to this many more prompt prefixes (branches), each shared
                                     # by several instances (depth 0 of every length, one per needle):
                                     # less prefill, a resident row each (rhead_jax.engine)
        prefill_chunk=1024,          # tokens per prefill call: bounds activation memory
        q_chunk=512,                 # attention query tile
        k_chunk=512,                 # attention key tile (cache sizes are multiples of it)
        pad_multiple=64,             # prompt / prefill widths rounded up to this: fewer recompiles
        extra_scores=(),             # more detectors from the same pass, each written to
                                     # head_scores_<name>.json: "mass", "query" (rhead_jax.detection)
        stop_when_stable=False,      # run the grid in rounds that spread over lengths, depths and needles
                                     # and stop once the top 10 is settled (rhead_jax.rounds, the rule in
                                     # rhead_jax.stability); summary.json says how many tests ran and why
        save_captures=False,         # keep what the copy score saw: per test, every head's top-k attended
                                     # positions and weights at every decode step, the generated tokens, the
                                     # answer span and the prompt tokens around the needle, in
                                     # batches/batch_NNNNN.npz (rhead_jax.captures; `python -m
                                     # rhead_jax.explore` draws them). Off by default: docs/explore.md
        capture_top_k=4,             # with save_captures: attended positions kept per head and step (the
                                     # score reads the top 1; the rest are shown on hover)
        attention="auto",            # prefill attention: "auto" (splash on TPU, cuDNN on GPU, chunked on
                                     # CPU), "chunked", "splash", "cudnn"; "splash:interpret" / "cudnn:xla"
                                     # run the kernel's reference form anywhere (models.kernels; docs/accel.md)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=1,                      # devices along the instance (batch) axis; -1 = the rest
        model=1,                     # devices along heads / MLP
        expert=1,                    # devices along MoE experts
    ))
    c.mask = ml_collections.ConfigDict(dict(   # head masking (rhead_jax.ablate)
        mode="zero",         # "zero": masked head's output x 0; "uniform": its attention becomes uniform;
                             # "mean_query" / "mean_output": its query (LOCOS's) / output <- its calibration mean
        phase="all",         # "all": prefill and decode; "decode": decode steps only (the original)
        calibration=4,       # mean modes: the means are over every token of this many of the task's prompts
    ))
    c.ablation = ml_collections.ConfigDict(dict(  # rhead_jax.ablate; its flags override these
        scores="",           # head-score file {"L-H": [scores]} (a sweep's head_scores.json); top:/random: need it;
                             # several rankings: "NAME:PATH,NAME:PATH,..." (JSONs, gate TSVs), top:K@NAME
        mask="top:20",       # top:K | random:K | list:L-H,L-H,... | none
        seeds=(0,),          # random:K: one draw per seed, results averaged over seeds ('(0,1,2)' on the CLI)
        sweep_k=(),          # e.g. (0, 5, 10, 20): accuracy vs number of masked heads, top-k vs random
        baseline=True,       # also run with no head masked (the reference accuracy)
        task="niah",         # "niah" (config.sweep's grid) | "qa:PATH" | "cot:PATH" (rhead_jax.qa)
        threshold=RETRIEVAL_THRESHOLD,  # random heads come from heads with mean score <= this
        extraction_ngram=5,  # taxonomy: this many consecutive response words found in the haystack
        qa_max_new_tokens=32,    # decode cap for qa: tasks (stops at a newline or EOS)
        cot_max_new_tokens=256,  # decode cap for cot: tasks (stops at EOS only)
    ))
    c.detectors = ml_collections.ConfigDict(dict(  # rhead_jax.detectors: scores on repeated random tokens
        length=2500,         # random tokens per repeat (RazorAttention's 2,500 x 4 for large models)
        repeats=4,           # the sequence is BOS + the same random tokens `repeats` times
        samples=2,           # random sequences averaged (one prefill each, batched)
        seed=0,
    ))
    c.gates = ml_collections.ConfigDict(dict(  # rhead_jax.gates: DuoAttention-style per-KV-head gates
        steps=2000,          # optimizer steps (batch 1), AdamW
        lr=0.02,
        l1=0.05,             # weight of the L1 penalty on the gates
        min_length=1000,     # haystack tokens of the synthetic prompts (DuoAttention's context length),
        max_length=32000,    # spread over the steps; prompts add the passkeys and the QA
        passkeys=10,         # passkeys per prompt, at depths spread over 5%-95%
        passkey_words=32,    # words per passkey
        sink=128,            # streaming heads' attention sink (tokens) in training
        recent=256,          # and their recent window
        checkpoint_every=50, # orbax checkpoint of gates + optimizer state every this many steps
        seed=0,
        chunk=256,           # attention tile; prompt widths are multiples of it (one program per width)
    ))
    c.mixedkv = ml_collections.ConfigDict(dict(  # rhead_jax.mixedkv: full heads + streaming heads
        sink=64,             # deployment sink / recent of the streaming heads (DuoAttention's 64 / 256)
        recent=256,
        full_fraction=(0.1, 0.25, 0.5),  # fractions of KV heads kept full
        seeds=(0, 1, 2),     # random choices of the full heads: one per seed
        heads=("random", "none", "all"),  # choices: NAME:PATH rankings (copy:head_scores.json, gates:x.tsv),
                                          # random, none (all streaming), all (full cache); --heads overrides
        lengths=(),          # the evaluation's context lengths; () = config.sweep.lengths
        depths=(),           # and needle depths (%); () = config.sweep.depths
    ))
    return c


def paper_grid(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's grid (ORIGINAL.md §1): 20 lengths 1K-50K x 10 depths x the needles."""
    c.sweep.lengths = tuple(paper_lengths())
    c.sweep.depths = tuple(paper_depths())
    return c


def key_paths(d, prefix: str = "") -> set[str]:
    """Every dotted key of a ConfigDict (sections and leaves)."""
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, ml_collections.ConfigDict):
            out |= key_paths(v, key + ".")
    return out


def valid_keys() -> list[str]:
    return sorted(key_paths(default_config()))


def check_keys(keys) -> None:
    """Refuse dotted keys outside the schema (a config file's or command-line overrides')."""
    valid = set(valid_keys())
    unknown = sorted(k for k in keys if k not in valid)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid_keys())}")


def _ints(values, what: str, *, minimum: int | None = None) -> None:
    vals = list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals) or (
            minimum is not None and any(v < minimum for v in vals)):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise UserError(f"{what} must list integers{bound}, got {vals}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuse unknown keys and bad values, naming the key and the fix; returns `c`."""
    check_keys(key_paths(c))
    missing = sorted(set(valid_keys()) - key_paths(c))
    if missing:
        raise UserError(f"config lacks key(s) {', '.join(missing)}: start config files from "
                        "rhead_jax.config.default_config()")
    s = c.sweep
    if not s.lengths or not s.depths:
        raise UserError("config.sweep.lengths and config.sweep.depths must be non-empty")
    if any(not 0 <= d <= 100 for d in s.depths):
        raise UserError(f"config.sweep.depths are percentages in [0, 100], got {list(s.depths)}")
    for k in ("max_new_tokens", "batch_size", "prefill_chunk", "q_chunk", "k_chunk", "pad_multiple"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise UserError(f"config.sweep.{k} must be an integer >= 1, got {s[k]!r}")
    if isinstance(s.batch_kv_mib, bool) or not isinstance(s.batch_kv_mib, (int, float)) or s.batch_kv_mib < 0:
        raise UserError(f"config.sweep.batch_kv_mib must be a number >= 0 (MiB; 0: no limit), got {s.batch_kv_mib!r}")
    if not isinstance(s.prefix_branches, int) or s.prefix_branches < 0:
        raise UserError(f"config.sweep.prefix_branches must be an integer >= 0, got {s.prefix_branches!r}")
    if not isinstance(s.stop_when_stable, bool):
        raise UserError(f"config.sweep.stop_when_stable must be True or False, got {s.stop_when_stable!r}")
    extra = list(s.extra_scores)
    if any(e not in EXTRA_SCORES for e in extra) or len(set(extra)) != len(extra):
        raise UserError(f"config.sweep.extra_scores must list distinct names out of {EXTRA_SCORES}, got {extra}; "
                        "e.g. --config.sweep.extra_scores='(\"mass\",\"query\")'")
    if not isinstance(s.save_captures, bool):
        raise UserError(f"config.sweep.save_captures must be True or False, got {s.save_captures!r}")
    if not isinstance(s.capture_top_k, int) or isinstance(s.capture_top_k, bool) or s.capture_top_k < 1:
        raise UserError(f"config.sweep.capture_top_k must be an integer >= 1, got {s.capture_top_k!r}")
    if s.attention.partition(":")[0] not in ("auto", "chunked", "splash", "cudnn"):
        raise UserError(f"config.sweep.attention must be auto, chunked, splash, cudnn, splash:interpret or "
                        f"cudnn:xla, got {s.attention!r}")
    if c.model.dtype not in DTYPES:
        raise UserError(f"config.model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
    if c.mask.mode not in MASK_MODES:
        raise UserError(f"config.mask.mode must be one of {MASK_MODES}, got {c.mask.mode!r}")
    if not isinstance(c.mask.calibration, int) or c.mask.calibration < 1:
        raise UserError(f"config.mask.calibration must be an integer >= 1 (prompts), got {c.mask.calibration!r}")
    if c.mask.phase not in MASK_PHASES:
        raise UserError(f"config.mask.phase must be one of {MASK_PHASES}, got {c.mask.phase!r}")
    a = c.ablation
    seeds = list(a.seeds)
    if not seeds:
        raise UserError("config.ablation.seeds must be a non-empty list of integers, got []")
    _ints(seeds, "config.ablation.seeds")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"config.ablation.seeds has duplicates: {seeds}")
    _ints(a.sweep_k, "config.ablation.sweep_k", minimum=0)
    if not 0 <= float(a.threshold):
        raise UserError(f"config.ablation.threshold must be >= 0, got {a.threshold}")
    if a.extraction_ngram < 2:
        raise UserError(f"config.ablation.extraction_ngram must be >= 2, got {a.extraction_ngram}")
    if a.qa_max_new_tokens < 1 or a.cot_max_new_tokens < 1:
        raise UserError("config.ablation.qa_max_new_tokens and cot_max_new_tokens must be >= 1")
    d = c.detectors
    for k, low in (("length", 2), ("repeats", 2), ("samples", 1), ("seed", 0)):
        if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < low:
            raise UserError(f"config.detectors.{k} must be an integer >= {low}, got {d[k]!r}")
    g = c.gates
    for k, lo in (("steps", 1), ("min_length", 1), ("passkeys", 1), ("passkey_words", 1), ("sink", 0),
                  ("recent", 1), ("checkpoint_every", 1), ("seed", 0), ("chunk", 8)):
        _ints([g[k]], f"config.gates.{k}", minimum=lo)
    _ints([g.max_length], "config.gates.max_length", minimum=g.min_length)
    if g.passkeys > 20 or not float(g.lr) > 0 or not float(g.l1) >= 0:
        raise UserError(f"config.gates: passkeys must be <= 20, lr > 0 and l1 >= 0; got passkeys={g.passkeys}, "
                        f"lr={g.lr}, l1={g.l1}")
    m = c.mixedkv
    _ints([m.sink], "config.mixedkv.sink", minimum=0)
    _ints([m.recent], "config.mixedkv.recent", minimum=1)
    fr = list(m.full_fraction)
    if not fr or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fr):
        raise UserError(f"config.mixedkv.full_fraction must list fractions in (0, 1], got {fr}")
    if not list(m.seeds) or len(set(m.seeds)) != len(list(m.seeds)):
        raise UserError(f"config.mixedkv.seeds must be distinct integers, at least one, got {list(m.seeds)}")
    _ints(m.seeds, "config.mixedkv.seeds")
    _ints(m.lengths, "config.mixedkv.lengths", minimum=1)
    _ints(m.depths, "config.mixedkv.depths", minimum=0)
    if any(d > 100 for d in m.depths):
        raise UserError(f"config.mixedkv.depths are percentages in [0, 100], got {list(m.depths)}")
    if isinstance(m.heads, str) or not all(isinstance(h, str) for h in m.heads) or not list(m.heads):
        raise UserError(f"config.mixedkv.heads must list head choices (strings), got {m.heads!r}")
    return c


# what a sweep's results do not depend on: the captures kept beside them (their batch files name
# their own kind, rhead_jax.results_store), so turning them on resumes a workdir
UNPINNED_SWEEP_KEYS = ("save_captures", "capture_top_k")


def sweep_json(c: ml_collections.ConfigDict) -> str:
    """What a detection sweep's results depend on, as the JSON pinned in its workdir. stop_when_stable
    (the batches' order) is pinned only when on, so the workdirs of sweeps without it stay valid;
    UNPINNED_SWEEP_KEYS never are."""
    pinned = ml_collections.ConfigDict(ml_collections.ConfigDict({k: c[k] for k in SWEEP_SECTIONS}).to_dict())
    drop = [k for k in UNPINNED_SWEEP_KEYS if k in pinned.sweep]   # a copy: c itself keeps the keys
    if not pinned.sweep.get("stop_when_stable", False):
        drop.append("stop_when_stable")
    for k in drop:
        del pinned.sweep[k]
    return pinned.to_json(sort_keys=True, indent=1)


# ----------------------------------------------------------------------------- config files


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the config files shipped with the package (the repository's configs/)."""
    try:
        root = importlib.resources.files("rhead_jax.configs")
    except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed: the configs/ beside the package
        root = Path(__file__).resolve().parent.parent / "configs"
        if not root.is_dir():
            return {}
    return {p.name[:-3]: Path(str(p)) for p in root.iterdir()
            if p.name.endswith(".py") and not p.name.startswith("_")}


def resolve_config_path(value: str) -> str:
    """A config file's path: as given when it exists, else a shipped config by (bare) name.

    `value` may carry config_flags' `:arg` suffix, which is kept."""
    path, sep, rest = value.partition(":")
    if Path(path).expanduser().is_file():
        return value
    shipped = shipped_configs()
    name = Path(path).name.removesuffix(".py")
    if path and Path(path).name == path or path.startswith("configs/"):
        if name in shipped:
            return str(shipped[name]) + sep + rest
    raise UserError(f"config file {path!r} not found; give a path to a config file or one of the shipped "
                    f"names: {', '.join(sorted(shipped))}")

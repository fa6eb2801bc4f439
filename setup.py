"""r1jax: a JAX-native reimplementation of the DeepSeek-R1 training system."""

from setuptools import find_packages, setup

setup(
    name="r1jax",
    version="0.1.0",
    description="DeepSeek-R1 style reasoning RL (GRPO) in JAX: TPU pods, GPUs and laptop CPUs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["r1jax", "r1jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18,<0.3",
        "sentencepiece>=0.2,<0.3",
        "numpy>=2.0",
        "absl-py>=2.1",
        "ml_collections>=1.1,<2",
        "math-verify>=0.9,<0.10",
        "matplotlib>=3.9,<4",
        # One path API for local and object-store workdirs (r1jax/core/storage.py).
        "etils[epath]>=1.7",
    ],
    extras_require={
        # HF checkpoints and tokenizers (tokenizer.json).
        "hf": ["safetensors>=0.8,<0.9", "tokenizers>=0.23,<0.24"],
        # The test suite: parity tests run transformers on a CPU-only torch.
        # pytest-xdist: the suite runs in two worker processes (WORKSPACE.md, "Tests").
        # tensorboardX: an independent reader of the event files r1jax writes itself.
        "test": ["pytest>=9,<10", "pytest-xdist>=3.8,<4", "torch==2.13.0", "tensorboardX>=2.6,<3",
                 "transformers>=5.23,<6", "safetensors>=0.8,<0.9", "tokenizers>=0.23,<0.24"],
        # libtpu for the pinned jax: TPU runs, and ahead-of-time compiles for a TPU slice on a
        # host without one (tools/aot_compile.py; CPU runs then need JAX_PLATFORMS=cpu).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # Workdirs and data on Google Cloud Storage (gs://…): epath's backend for it.
        "gcs": ["gcsfs>=2024.2"],
        # Benchmarks only: TRL's GRPOTrainer side by side (tools/trl_grpo.py).
        "bench": ["trl==1.16.0", "torch==2.13.0", "transformers>=5.23,<6"],
    },
)

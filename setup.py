"""vilscale: pretrain Multi-Scale Vision Longformer (ViL) at cluster scale."""

from setuptools import find_packages, setup

# torch is pinned by the Makefile (TORCH_SPEC) before this is installed, so a fresh install does not
# pull a different build; the range here only says what vilscale works with.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy",
    "deepspeed>=0.15",
    "ray[default,train]>=2.40",
    "ffcv==1.0.2",
    "Pillow",  # ffcv imports it without declaring it
    "opencv-python",  # ffcv's decoders
    "numba",
    "submitit>=1.5",
    "pyyaml",
    "prometheus-client",
    "triton>=3.0",  # its interpreter (TRITON_INTERPRET=1) runs the kernels on CPU
    "kornia>=0.7",
    "scikit-learn",  # the handwritten digits of the quickstart
    "safetensors",
    "matplotlib",
    "tqdm",
    "ninja",  # one ninja for DeepSpeed's JIT-built communication op
]

TEST_REQUIRES = ["pytest>=8", "pytest-timeout", "hypothesis", "ruff"]

setup(
    name="vilscale",
    version="0.1.0",
    description="Multi-Scale Vision Longformer pretraining with DeepSpeed, Ray, SLURM and FFCV",
    packages=find_packages(include=["vilscale", "vilscale.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["vilscale = vilscale.cli:main"]},
)

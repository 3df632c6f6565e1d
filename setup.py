"""vilscale: pretrain Multi-Scale Vision Longformer (ViL) at cluster scale."""

from setuptools import Extension, find_packages, setup

# torch is pinned by the Makefile (TORCH_SPEC) before this is installed, so a fresh install does not
# pull a different build; the range here only says what vilscale works with.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",  # detection heads, FPN, NMS, RoIAlign and COCO reading (a build matching torch's)
    "pycocotools",  # COCO annotations and box/mask AP
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
    "tensorboard",  # metrics.tensorboard (torch.utils.tensorboard writes, tensorboard reads)
    "triton>=3.0",  # its interpreter (TRITON_INTERPRET=1) runs the kernels on CPU
    "kornia>=0.7",
    "scikit-learn",  # the handwritten digits of the quickstart
    "safetensors",
    "matplotlib",
    "tqdm",
    "ninja",  # one ninja for DeepSpeed's JIT-built communication op
]

# The training loader's JPEG decoder: decodes only the rows and columns a random crop needs, scaled in the
# DCT domain (vilscale/data/_cropdecode.c). It links the system libjpeg(-turbo) that ffcv's build needs too
# (the Makefile's FFCV_SYSTEM_PACKAGES).
CROP_DECODER = Extension("vilscale.data._cropdecode", sources=["vilscale/data/_cropdecode.c"], libraries=["jpeg", "m"],
                         extra_compile_args=["-O3", "-std=c11"])

TEST_REQUIRES = ["pytest>=8", "pytest-timeout", "hypothesis", "ruff"]

setup(
    name="vilscale",
    version="0.1.0",
    description="Multi-Scale Vision Longformer pretraining with DeepSpeed, Ray, SLURM and FFCV",
    packages=find_packages(include=["vilscale", "vilscale.*"]),
    # the job specs and their monitoring configuration travel with the package (`vilscale jobs`)
    package_data={"vilscale": ["jobs/*.yaml", "jobs/monitoring/*.yml", "jobs/monitoring/*.json",
                               "jobs/monitoring/targets/*"]},
    ext_modules=[CROP_DECODER],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["vilscale = vilscale.cli:main"]},
)

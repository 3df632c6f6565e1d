"""Multi-Scale Vision Longformer (ViL): variants, official checkpoints and FLOP counting."""

from vilscale.model.config import StageConfig, ViLConfig
from vilscale.model.registry import VARIANTS, build_config, create_model, list_models
from vilscale.model.vil import VisionLongformer

__all__ = ["VARIANTS", "StageConfig", "ViLConfig", "VisionLongformer", "build_config", "create_model",
           "list_models"]

"""Multi-Scale Vision Longformer (ViL): variants, official checkpoints and FLOP counting."""

from vilscale.model.adapt import Adaptation, adapt_state_dict
from vilscale.model.config import StageConfig, ViLConfig
from vilscale.model.flops import count_flops
from vilscale.model.official import load_official, official_to_vilscale, read_official, vilscale_to_official
from vilscale.model.registry import VARIANTS, build_config, create_model, list_models
from vilscale.model.vil import VisionLongformer

__all__ = ["VARIANTS", "Adaptation", "StageConfig", "ViLConfig", "VisionLongformer", "adapt_state_dict", "build_config",
           "count_flops", "create_model", "list_models", "load_official", "official_to_vilscale", "read_official",
           "vilscale_to_official"]

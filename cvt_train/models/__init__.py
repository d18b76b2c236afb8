from .cvt import CvT, QuickGELU, compile_model, create_backbone, num_params
from .presets import ModelConfig, StageConfig, model_config, official_spec_to_config, preset_names, stage_map_sizes

__all__ = [
    "CvT",
    "QuickGELU",
    "compile_model",
    "create_backbone",
    "num_params",
    "ModelConfig",
    "StageConfig",
    "model_config",
    "official_spec_to_config",
    "preset_names",
    "stage_map_sizes",
]

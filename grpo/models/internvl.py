"""InternVL (the `-hf` checkpoints, `InternVLForConditionalGeneration`): images cut into 448-px
tiles plus a thumbnail, a fixed number of `<IMG_CONTEXT>` tokens per tile after pixel shuffle,
1-D positions. The original checkpoints use remote code and another class; they run on the plain
path as any model of no known family does.
"""

from __future__ import annotations

from .base import inner_model
from .pooled import PooledFeaturesFamily


class InternVLFamily(PooledFeaturesFamily):
    name = "internvl"
    model_types = ("internvl",)
    packs_groups = True

    def _vision_output(self, model, pixel_values):
        config = inner_model(model).config
        return inner_model(model).get_image_features(
            pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True)

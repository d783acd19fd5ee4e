"""NanoDet-Plus-m_416 on COCO: ShuffleNetV2 1.0x, 416x416 input.

Same recipe as the reference nanodet-plus-m_416.yml.
"""

import ml_collections

from nanodet_jax.config import nanodet_plus_recipe


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(nanodet_plus_recipe(model_size="1.0x", input_size=416))

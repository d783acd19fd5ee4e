"""Default COCO training config: the NanoDet-Plus-m 416 recipe.

Edit ``data.train.img_path``/``ann_path`` (and ``data.val``) to point at your COCO copy.
"""

import ml_collections

from nanodet_jax.config import nanodet_plus_recipe


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(nanodet_plus_recipe(model_size="1.0x", input_size=416))

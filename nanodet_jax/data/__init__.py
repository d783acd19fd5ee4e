"""Data pipeline: host-side transforms (``transforms``); readers and loaders build on them."""

from nanodet_jax.data.transforms import (
    Transformed,
    collate_images,
    normalize,
    shape_transform,
    to_unit_float,
    val_transform,
    warp_boxes,
    warp_image,
)

__all__ = ["Transformed", "collate_images", "normalize", "shape_transform", "to_unit_float",
           "val_transform", "warp_boxes", "warp_image"]

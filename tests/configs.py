"""Small model configs the tests train (shared so that each cut lives in one place)."""

from __future__ import annotations

from nanodet_jax.config import nanodet_plus_tiny
from nanodet_jax.data.synthetic import CLASS_NAMES


def light_tiny(size: int) -> dict:
    """The tiny preset (synthetic classes, ``size`` x ``size``) cut further for compile time:
    3x3 depthwise kernels, one stacked conv per head, three levels (strides 8, 16, 32)."""
    raw = nanodet_plus_tiny(size, CLASS_NAMES)
    arch = raw["model"]["arch"]
    arch["fpn"].update(kernel_size=3, num_extra_level=0)
    arch["head"].update(kernel_size=3, stacked_convs=1, strides=[8, 16, 32])
    arch["aux_head"].update(stacked_convs=1, strides=[8, 16, 32], feat_channels=32)
    return raw

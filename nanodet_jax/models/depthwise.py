"""The project's single depthwise-convolution op (placeholder: native grouped conv).

Signature is fixed; the fast CPU path is being written.
"""

from __future__ import annotations

import jax
from jax import lax


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
                   impl: str | None = None) -> jax.Array:
    """Depthwise 2-D convolution, NHWC.

    x: (N, H, W, C); kernel: (kh, kw, 1, C) (Flax HWIO with feature_group_count=C);
    symmetric explicit padding on both spatial dims. Returns (N, H', W', C).
    """
    c = x.shape[-1]
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

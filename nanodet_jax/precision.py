"""Mixed precision: the reference's ``device.precision`` switch read as bfloat16 activations.

``device.precision: 32`` (default) computes everything in float32. ``device.precision: 16``
(the reference's AMP switch) runs the model's activations and convolutions in **bfloat16**
(wider exponent than float16: no loss scaling needed) while parameters, optimizer state,
EMA, BatchNorm/GroupNorm statistics, the head outputs handed to the losses, the assigner's
costs and its top-k all stay float32. The cast happens at the model boundary: images go in
as bfloat16, each layer casts its float32 parameters to the activation dtype, and the
predictions come out cast back to float32 (:func:`model_outputs_f32`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.config import check_precision

PRECISIONS = {32: jnp.float32, 16: jnp.bfloat16}


def compute_dtype(cfg_or_value: Any, source: str = "<config>") -> jnp.dtype:
    """The activation dtype for a config (or its ``device.precision`` value): 32 -> float32,
    16 -> bfloat16; anything else is a ConfigError naming the field."""
    value = cfg_or_value
    if not isinstance(value, (int, str)):
        value = cfg_or_value["device"]["precision"]
    return PRECISIONS[check_precision(value, source)]


def model_outputs_f32(tree: Any) -> Any:
    """Every floating array of ``tree`` (model outputs) as float32."""
    return jax.tree.map(lambda a: a.astype(jnp.float32)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

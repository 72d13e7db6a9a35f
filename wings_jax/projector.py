"""The multimodal projector (spec section 1, step 3): vision features (..., W) -> LLM width (..., d).

``linear``: one Dense. ``mlp{N}x_gelu``: Dense(W -> d), then N - 1 times [exact erf GELU, Dense(d -> d)]
(torch ``mm_projector.{0, 2, 4, ...}`` are ``linear_{0, 1, 2, ...}``). ``identity``: features pass
through unchanged, which needs W == d.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wings_jax.config import ProjectorConfig
from wings_jax.dense import TokenDense

Dtype = Any


class Projector(nn.Module):
    """Maps (..., in_dim) image features to (..., out_dim) LLM embeddings."""

    config: ProjectorConfig
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        depth = self.config.mlp_depth
        if depth == 0:
            if features.shape[-1] != self.out_dim:
                raise ValueError(
                    f"projector.type='identity' needs the vision width {features.shape[-1]} to equal "
                    f"the LLM hidden size {self.out_dim}"
                )
            return features.astype(self.dtype)
        x = features
        for i in range(depth):
            if i > 0:
                x = nn.gelu(x, approximate=False)
            in_axis = "vit_embed" if i == 0 else "mlp"  # the (d, d) layers cannot name 'embed' twice
            x = TokenDense(
                self.out_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name=f"linear_{i}",
            )(x)
        return x

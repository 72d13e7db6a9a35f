"""A Dense layer applied to all tokens as one 2-D matmul."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Outputs at most this wide (the learners' rank-r factors) take ``_narrow_matmul``.
NARROW_FEATURES = 64


class TokenDense(nn.Dense):
    """``nn.Dense`` (same parameters, same names) that folds the leading axes into one before the matmul.

    Why: XLA:CPU lays out the backward of a (B, L, d) @ (d, f) dot with transposing copies of the
    (B, L, f) cotangent, fused with the elementwise ops feeding it, which cost as much as the matmuls
    themselves. The 2-D form's backward stays two plain matmuls: a SwiGLU MLP's forward + backward at
    (1, 1024, 512) -> 1408 went from 103 ms to 53 ms. Folding batch into length keeps any batch
    sharding, the batch being the major axis; the length axis is never sharded (``sharding.rules``),
    which a fold under the batch could not express without gathering.
    """

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        leading = inputs.shape[:-1]
        flat = inputs.reshape(-1, inputs.shape[-1])
        if self.features <= NARROW_FEATURES and not self.use_bias:
            kernel = self.param("kernel", self.kernel_init, (flat.shape[-1], self.features), self.param_dtype)
            out = _narrow_matmul(flat.astype(self.dtype), kernel.astype(self.dtype))
        else:
            out = super().__call__(flat)
        return out.reshape(*leading, self.features)


@jax.custom_vjp
def _narrow_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x (T, d) @ kernel (d, r) for a narrow r, with the kernel's gradient computed as (g^T x)^T.

    Autodiff's x^T g puts the wide x on the left of a product over tokens, which XLA:CPU hands to
    Eigen, and Eigen packs all of x for r columns: 0.99 ms at (1024, 512) x (1024, 8); g^T x takes
    the fast path, 0.19 ms with the small transpose (the learners' factors: 2 % of a bench_small step).
    """
    return x @ kernel


def _narrow_forward(x, kernel):
    return x @ kernel, (x, kernel)


def _narrow_backward(residuals, grad):
    x, kernel = residuals
    # the barrier keeps XLA from folding the transpose back into a product of x^T and g
    kernel_grad = jax.lax.optimization_barrier(jnp.einsum("tr,td->rd", grad, x)).T
    return grad @ kernel.T, kernel_grad.astype(kernel.dtype)


_narrow_matmul.defvjp(_narrow_forward, _narrow_backward)

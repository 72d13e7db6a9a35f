"""TokenDense against flax's nn.Dense: same parameters, outputs, gradients and forward-mode derivatives,
narrow or wide."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from wings_jax.dense import NARROW_FEATURES, NARROW_MIN_TOKENS, TokenDense


@pytest.mark.parametrize(("features", "tokens", "narrow"), [
    (8, NARROW_MIN_TOKENS, True), (NARROW_FEATURES + 1, NARROW_MIN_TOKENS, False), (8, NARROW_MIN_TOKENS - 2, False),
])
def test_token_dense_matches_flax_dense_and_its_gradients(features, tokens, narrow):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, tokens // 2, 16))
    dense, token_dense = nn.Dense(features, use_bias=False), TokenDense(features, use_bias=False)
    params = dense.init(jax.random.PRNGKey(1), x)
    takes_narrow_path = "optimization_barrier" in str(jax.make_jaxpr(token_dense.apply)(params, x))
    assert takes_narrow_path == narrow
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(token_dense.init(
        jax.random.PRNGKey(1), x))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, tokens // 2, features))

    def loss(module):
        return lambda p, inputs: (module.apply(p, inputs) * cotangent).sum()

    want = jax.grad(loss(dense), argnums=(0, 1))(params, x)
    got = jax.grad(loss(token_dense), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(token_dense.apply(params, x), dense.apply(params, x), rtol=1e-6, atol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    tangents = jax.tree_util.tree_map(lambda leaf: jax.random.normal(jax.random.PRNGKey(3), leaf.shape), (params, x))
    _, want_tangent = jax.jvp(lambda p, inputs: dense.apply(p, inputs), (params, x), tangents)
    _, got_tangent = jax.jvp(lambda p, inputs: token_dense.apply(p, inputs), (params, x), tangents)
    np.testing.assert_allclose(got_tangent, want_tangent, rtol=1e-5, atol=1e-5)

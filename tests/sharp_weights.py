"""Random weights with O(1) activations for tests: with the usual 0.02 init, attention is nearly
uniform and a wrong position, mask or multiplier would move outputs by less than the tolerance."""

import jax
import numpy as np

from wings_jax.model import init_params

KERNEL_GAIN = 0.7  # sharp, yet fp32 rounding stays well under the tolerance


def sharpen(params, seed=0):
    """Random O(1)-activation weights for every leaf (see module docstring)."""
    rng = np.random.default_rng(seed)

    def leaf(path, value):
        names = [getattr(k, "key", str(k)) for k in path]
        shape = tuple(value.shape)
        if names[-1] == "scale":
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if names[-1] == "bias":
            return (0.5 * rng.standard_normal(shape)).astype(np.float32)
        if "router" in names:
            return (0.5 * rng.standard_normal(shape)).astype(np.float32)
        if names[-1] == "embedding":
            return rng.standard_normal(shape).astype(np.float32)
        fan_in = shape[-2] if len(shape) >= 2 else 1
        return (KERNEL_GAIN * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, params)


def sharp_params(config, seed=0):
    """Sharp parameters for ``config``, drawn from the parameter shapes alone (no init compile)."""
    return sharpen(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))), seed)

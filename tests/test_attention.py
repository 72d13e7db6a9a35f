"""Attention backends against the ``xla`` reference: outputs, routed value channels and gradients."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharp_weights import sharp_params
from test_learners import make_batch

from wings_jax.attention import MaskSpec, attention, dot_product_attention, flash_attention, resolve_backend
from wings_jax.model import WingsModel
from wings_jax.presets import tiny_model

TOLERANCE = 1e-4


def random_inputs(seed, batch=2, q_len=37, kv_len=37, heads=4, kv_heads=2, head_dim=8, channels=3):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return (normal(batch, q_len, heads, head_dim), normal(batch, kv_len, kv_heads, head_dim),
            normal(batch, kv_len, kv_heads, head_dim), normal(batch, kv_len, channels)), rng


def masks(rng, batch, q_len, kv_len):
    """The mask shapes the model uses, plus rows that see no key at all."""
    q_index = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    kv_index = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    valid = jnp.asarray(rng.random((batch, kv_len)) > 0.3)
    padded = jnp.arange(kv_len)[None] < jnp.array([[kv_len], [kv_len - 9]])  # right padding, as in batches
    return {
        "causal_padded": MaskSpec(q_index, kv_index, padded, causal=True),
        # keys start at position 5: queries 0..4 see nothing and must get zeros
        "causal_sparse_shifted": MaskSpec(q_index, kv_index + 5, valid, causal=True),
        "full_sparse": MaskSpec(jnp.zeros_like(q_index), kv_index, valid, causal=False),
        "sample_sees_nothing": MaskSpec(q_index, kv_index, valid.at[1].set(False), causal=True),
    }


def loss_and_grads(attend, inputs, mask):
    """A loss that weighs every output element differently, so any wrong gradient entry shows."""
    def loss(q, k, v, extra):
        out, routed = attend(q, k, v, mask, extra)
        return (out * jnp.sin(out + 1.0)).sum() + (routed * jnp.cos(routed)).sum(), (out, routed)

    (value, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*inputs)
    return value, outputs, grads


def assert_same(expected, actual, what):
    expected, actual = np.asarray(expected), np.asarray(actual)
    error = np.abs(expected - actual).max()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


def check_against_xla(attend, inputs, mask):
    reference = loss_and_grads(functools.partial(attention, backend="xla"), inputs, mask)
    actual = loss_and_grads(attend, inputs, mask)
    assert_same(reference[1][0], actual[1][0], "output")
    assert_same(reference[1][1], actual[1][1], "routed channels")
    for name, want, got in zip(("dq", "dk", "dv", "d_extra"), reference[2], actual[2], strict=True):
        assert_same(want, got, name)
    return reference


@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse", "sample_sees_nothing"])
def test_flash_matches_xla_with_blocks_that_do_not_divide_the_length(mask_name):
    inputs, rng = random_inputs(0, q_len=37, kv_len=45)
    mask = masks(rng, 2, 37, 45)[mask_name]
    attend = functools.partial(flash_attention, block_q=8, block_k=16)
    reference = check_against_xla(attend, inputs, mask)
    if mask_name in ("causal_sparse_shifted", "sample_sees_nothing"):
        # the reference itself gives the zero rows the contract promises, so the comparison covers them
        out = np.asarray(reference[1][0])
        seen = np.asarray(mask.kv_valid)[:, None, :] & (
            np.asarray(mask.kv_index)[:, None, :] <= np.asarray(mask.q_index)[:, :, None])
        blind = ~seen.any(-1)  # (B, Lq)
        assert blind.any() and np.all(out[blind] == 0.0)


def assert_half_precision_follows_float32_reference(attend, inputs, mask):
    """Run ``attend`` on bfloat16 copies of ``inputs``: outputs and gradients come back in bfloat16 and agree
    with the float32 ``xla`` reference to bfloat16 precision (the routed channels come back in float32)."""
    half = tuple(x.astype(jnp.bfloat16) for x in inputs)
    _, (out, routed), grads = loss_and_grads(attend, half, mask)
    assert out.dtype == jnp.bfloat16 and routed.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 4
    _, (want_out, want_routed), want_grads = loss_and_grads(functools.partial(attention, backend="xla"),
                                                            tuple(x.astype(jnp.float32) for x in half), mask)
    for name, want, got in zip(("output", "routed", "dq", "dk", "dv", "d_extra"),
                               (want_out, want_routed, *want_grads), (out, routed, *grads), strict=True):
        want, got = np.asarray(want), np.asarray(got, np.float32)
        error = np.abs(want - got).max() / np.abs(want).max()
        assert error < 0.03, f"{name}: max error {error:.3f} of the largest entry"


def test_flash_in_bfloat16_keeps_dtypes_and_follows_the_float32_reference():
    """bfloat16 inputs, the released recipes' compute dtype."""
    inputs, rng = random_inputs(5, q_len=40, kv_len=40)
    mask = masks(rng, 2, 40, 40)["causal_padded"]
    assert_half_precision_follows_float32_reference(functools.partial(flash_attention, block_q=8, block_k=16),
                                                    inputs, mask)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention exists only on NVIDIA GPUs "
                    "(run with JAX_PLATFORMS=cuda); off GPU the wrapper is tested with the portable kernel above")
@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse", "sample_sees_nothing"])
def test_cudnn_kernel_on_gpu_follows_the_float32_reference(mask_name):
    """The real cuDNN kernel, at a head width it accepts and lengths that are no multiple of its tiles."""
    inputs, rng = random_inputs(6, q_len=77, kv_len=90, head_dim=64)
    mask = masks(rng, 2, 77, 90)[mask_name]
    assert_half_precision_follows_float32_reference(functools.partial(attention, backend="cudnn"), inputs, mask)


def test_flash_without_extra_values_returns_none():
    inputs, rng = random_inputs(1, q_len=20, kv_len=20)
    mask = masks(rng, 2, 20, 20)["causal_padded"]
    out, routed = flash_attention(*inputs[:3], mask, block_q=8, block_k=8)
    assert routed is None
    assert_same(attention(*inputs[:3], mask, backend="xla")[0], out, "output")


@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse"])
def test_dot_product_attention_wrapper_matches_xla(mask_name):
    """The cudnn backend's wrapping (mask, zero rows, the routed channels as a padded value pass), run
    with ``jax.nn.dot_product_attention``'s portable implementation: only the kernel choice differs on GPU."""
    inputs, rng = random_inputs(2, q_len=23, kv_len=29)  # odd lengths: the padding cuDNN needs
    mask = masks(rng, 2, 23, 29)[mask_name]
    check_against_xla(functools.partial(dot_product_attention, implementation="xla"), inputs, mask)


def test_cudnn_refuses_float32_with_a_clear_error():
    inputs, rng = random_inputs(3, q_len=8, kv_len=8)
    mask = masks(rng, 2, 8, 8)["causal_padded"]
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention(*inputs[:3], mask, inputs[3], backend="cudnn")


def test_auto_picks_by_platform_dtype_and_lengths():
    assert resolve_backend("auto", jnp.bfloat16, 1, 128, platform="gpu") == "cudnn"
    assert resolve_backend("auto", jnp.float32, 512, 512, platform="gpu") == "flash"
    assert resolve_backend("auto", jnp.bfloat16, 512, 512, platform="tpu") == "splash"
    assert resolve_backend("auto", jnp.bfloat16, 1, 4096, platform="tpu") == "xla"  # a decode step
    assert resolve_backend("auto", jnp.float32, 64, 64, platform="cpu") == "xla"
    assert resolve_backend("auto", jnp.float32, 1, 4096, platform="cpu") == "xla"  # a decode step
    assert resolve_backend("auto", jnp.bfloat16, 4096, 4096, platform="cpu") == "flash"
    assert resolve_backend("flash", jnp.float32, 8, 8, platform="cpu") == "flash"
    assert resolve_backend("splash", jnp.float32, 8, 8, platform="cpu") == "splash"
    with pytest.raises(ValueError, match="'pallas' is not one of"):
        resolve_backend("pallas", jnp.float32, 8, 8)


def tiny_stage2_case():
    """(config, batch, params) of the tiny stage-2 model on a one-image row and a text-only row."""
    base = tiny_model(scan_layers=True)
    config = base.replace(wings=dataclasses.replace(base.wings, stage=2)).validate()
    return config, make_batch(config, [[4, "img", 9], [6]], seq_len=40), sharp_params(config)


def check_stage2_model_against_xla(backend: str):
    """The whole stage-2 model on ``backend``: main attention with the router channels, both learners,
    the loss and every gradient against the ``xla`` backend."""
    config, batch, params = tiny_stage2_case()

    def loss_and_grad(backend):
        model = WingsModel(config.replace(attention_backend=backend))
        return jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, batch)["loss"]))(params)

    (want_loss, want_grads), (loss, grads) = loss_and_grad("xla"), loss_and_grad(backend)
    assert_same(want_loss, loss, "loss")
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert_same(flat_want[path], grad, f"gradient {jax.tree_util.keystr(path)}")


def test_stage2_model_with_flash_matches_xla():
    check_stage2_model_against_xla("flash")


def test_flash_gradient_inside_a_scan_holds_nothing_of_length_squared_size():
    """Differentiated inside a scan (as the scanned decoder layers are), the kernel must not leave any
    (Lq, Lk)-sized residual (e.g. every tile's probabilities) for the backward pass."""
    length = 256
    (q, k, v, extra), rng = random_inputs(4, batch=2, q_len=length, kv_len=length)
    mask = masks(rng, 2, length, length)["causal_padded"]

    def loss(q, k, v, extra):
        def layer(x, _):
            return flash_attention(x, k, v, mask, extra, block_q=32, block_k=32)[0], None

        return jax.lax.scan(layer, q, None, length=2)[0].sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, extra))
    sizes = [int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"\[(\d+(?:,\d+)*)\]", jaxpr)]
    assert max(sizes) < length * length, f"an array of {max(sizes)} elements >= Lq * Lk = {length * length}"

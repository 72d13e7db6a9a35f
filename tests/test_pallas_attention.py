"""The ``splash`` backend (Pallas TPU kernels) in Pallas interpret mode against the ``xla`` reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_attention import loss_and_grads, masks, random_inputs, tiny_stage2_case

from wings_jax.attention import MaskSpec, attention
from wings_jax.model import WingsModel
from wings_jax.pallas_attention import _Plan, _tables, splash_attention

# float32 rounding relative to the largest reference entry (the extra-value gradients reach ~20)
TOLERANCE = 1e-5
Q_LEN, KV_LEN = 37, 45  # neither a multiple of the blocks (8, 16): the kernels pad
BLOCKS = {"block_q": 8, "block_k": 16}
XLA = functools.partial(attention, backend="xla")
# the plain interpreter, compiled once for all masks of a kind (the TPU interpreter is 3x slower)
SPLASH = functools.partial(splash_attention, **BLOCKS, interpret=True)
RUN = jax.jit(loss_and_grads, static_argnums=0)


def assert_close(expected, actual, what):
    expected, actual = np.asarray(expected), np.asarray(actual)
    error = np.abs(expected - actual).max()
    bound = TOLERANCE * max(1.0, np.abs(expected).max())
    assert error <= bound, f"{what}: max abs error {error:.2e} > {bound:.2e}"


def assert_matches_xla(attend, inputs, mask):
    """Output, routed channels and the gradients of q, k, v and the extra values; returns ``attend``'s."""
    want, got = RUN(XLA, inputs, mask), RUN(attend, inputs, mask)
    assert_close(want[1][0], got[1][0], "output")
    assert_close(want[1][1], got[1][1], "routed channels")
    for name, expected, actual in zip(("dq", "dk", "dv", "d_extra"), want[2], got[2], strict=True):
        assert_close(expected, actual, name)
    return got


def all_masks(rng, batch, q_len, kv_len):
    """``test_attention``'s masks, plus positions that are neither a range nor sorted, and keys shifted
    so that some tiles' only visible pair has equal positions (the edge of the live-tile test)."""
    masks_ = masks(rng, batch, q_len, kv_len)
    scrambled = MaskSpec(jnp.asarray(rng.integers(-4, 40, (batch, q_len))),
                         jnp.asarray(rng.integers(-4, 40, (batch, kv_len))),
                         jnp.asarray(rng.random((batch, kv_len)) > 0.2), causal=True)
    padded = masks_["causal_padded"]
    edge = MaskSpec(padded.q_index, padded.kv_index + BLOCKS["block_q"] - 1, padded.kv_valid, causal=True)
    return {**masks_, "causal_scrambled": scrambled, "causal_tile_edge": edge}


def blind_rows(mask):
    """(B, Lq) True where a query sees no key."""
    seen = np.asarray(mask.kv_valid)[:, None, :]
    if mask.causal:
        seen = seen & (np.asarray(mask.kv_index)[:, None, :] <= np.asarray(mask.q_index)[:, :, None])
    return ~seen.any(-1)


@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse",
                                       "sample_sees_nothing", "causal_scrambled", "causal_tile_edge"])
def test_splash_matches_xla(mask_name):
    """Grouped heads (4 over 2), Lq != Lk, padding, dynamic positions; rows that see nothing get zeros."""
    inputs, rng = random_inputs(0, q_len=Q_LEN, kv_len=KV_LEN)
    mask = all_masks(rng, 2, Q_LEN, KV_LEN)[mask_name]
    got = assert_matches_xla(SPLASH, inputs, mask)
    if mask_name in ("causal_sparse_shifted", "sample_sees_nothing"):
        blind = blind_rows(mask)
        assert blind.any() and np.all(np.asarray(got[1][0])[blind] == 0.0)


def test_splash_in_tpu_interpret_mode():
    """Pallas's TPU interpreter, where scratch read before it is written is NaN and out-of-bounds block
    reads raise (the plain interpreter forgives both)."""
    inputs, rng = random_inputs(1, q_len=20, kv_len=27, heads=2, kv_heads=1)
    mask = masks(rng, 2, 20, 27)["causal_sparse_shifted"]
    assert_matches_xla(functools.partial(splash_attention, **BLOCKS, interpret=pltpu.InterpretParams()), inputs, mask)


def test_splash_without_extra_values():
    inputs, rng = random_inputs(2, q_len=Q_LEN, kv_len=KV_LEN)
    mask = masks(rng, 2, Q_LEN, KV_LEN)["causal_padded"]

    def loss_and_grads_without_extra(attend):
        def loss(q, k, v):
            out, routed = attend(q, k, v, mask)
            assert routed is None
            return (out * jnp.sin(out + 1.0)).sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*inputs[:3])

    want, got = loss_and_grads_without_extra(XLA), loss_and_grads_without_extra(SPLASH)
    for name, expected, actual in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(want), jax.tree.leaves(got),
                                      strict=True):
        assert_close(expected, actual, name)


def test_splash_skips_tiles_that_see_nothing():
    """Causal over plain positions: only tiles on or below the diagonal are live, and a dead tile
    names a block its neighbour loads, so Pallas skips its copy."""
    positions = jnp.broadcast_to(jnp.arange(32), (1, 32))
    mask = MaskSpec(positions, positions, jnp.ones((1, 32), bool), causal=True)
    tables = _tables(mask, 0, 0, _Plan(causal=True, block_q=8, block_k=8, interpret=True))
    np.testing.assert_array_equal(tables.live[0], np.tril(np.ones((4, 4), np.int32)))
    np.testing.assert_array_equal(tables.fetch_k[0], np.minimum(np.arange(4)[None, :], np.arange(4)[:, None]))
    np.testing.assert_array_equal(tables.fetch_q[0], np.maximum(np.arange(4)[None, :], np.arange(4)[:, None]))


@pytest.mark.parametrize("with_extra", [True, False])
def test_splash_lowers_to_mosaic_for_tpu(with_extra):
    """Forward and both backward kernels pass Pallas's TPU lowering (block shapes, supported ops) for
    bfloat16 and lane-sized blocks; compiling the Mosaic code needs a TPU and is not checked here."""
    batch, length, heads, kv_heads, head_dim = 2, 384, 4, 2, 128
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
    extra = jax.ShapeDtypeStruct((batch, length, 3), jnp.float32)
    index, valid = jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), bool)

    def loss(q, k, v, extra, q_index, kv_index, kv_valid):
        out, routed = splash_attention(q, k, v, MaskSpec(q_index, kv_index, kv_valid), extra if with_extra else None,
                                       block_q=128, block_k=128, interpret=False)
        return out.astype(jnp.float32).sum() + (routed.sum() if with_extra else 0.0)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, extra, index, index, valid).lower(
        lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3


def test_splash_refuses_what_it_cannot_run():
    inputs, rng = random_inputs(3, q_len=8, kv_len=8)
    q, k, v, extra = inputs
    mask = masks(rng, 2, 8, 8)["causal_padded"]
    with pytest.raises(ValueError, match="all float32 or all bfloat16; got float16"):
        splash_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), mask)
    with pytest.raises(ValueError, match="block_k=64 must be a multiple of 128"):
        splash_attention(q, k, v, mask, block_k=64, interpret=False)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3"):
        splash_attention(q, jnp.concatenate([k, k[:, :, :1]], 2), jnp.concatenate([v, v[:, :, :1]], 2), mask)
    with pytest.raises(ValueError, match=r"extra_values \(B, Lk, C\)"):
        splash_attention(q, k, v, mask, extra[:, :4])


def test_stage2_model_with_splash_matches_xla():
    """The tiny stage-2 model's logits: decoder attention with the router channels, both learners, all
    through the kernels (interpreted off TPU). Their gradients are checked above, kernel by kernel."""
    config, batch, params = tiny_stage2_case()

    def logits(backend):
        model = WingsModel(config.replace(attention_backend=backend))
        return jax.jit(lambda p: model.apply({"params": p}, batch, mode="logits"))(params)

    real = np.asarray(batch["attention_mask"], bool)
    assert_close(np.asarray(logits("xla"))[real], np.asarray(logits("splash"))[real], "logits")

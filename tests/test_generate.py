"""KV-cache generation against full recomputation, sampling filters, stop tokens and the errors.

Full recomputation runs ``WingsModel`` over the whole sequence for every token; its logits are the
model's, which tests/test_learners.py checks against the materialised reference. Weights are sharp
(see sharp_weights.sharpen), so a wrong cache slot, mask or router column changes the logits by far
more than the tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharp_weights import sharp_params
from test_learners import config_for, make_batch

from wings_jax import generate as generate_module
from wings_jax.generate import Sampling, _choose, generate, greedy_generate
from wings_jax.model import WingsModel, init_params

TOLERANCE = 1e-4
STEPS = 6
# one batch: a two-image prompt, a one-image prompt and a text-only prompt, all of different lengths
MIXED = [[2, "img", 3, "img", 2], [4, "img", 5], [7]]


@pytest.fixture(scope="module")
def stage2():
    config = config_for("causal", 2, max_images=2)
    params = sharp_params(config)
    return config, params, make_batch(config, MIXED, seq_len=40)


def _both_ways(config, params, batch, sampling, rng=None):
    cached = generate(config, params, batch, sampling, rng=rng, method="cache", return_logits=True)
    full = generate(config, params, batch, sampling, rng=rng, method="recompute", return_logits=True)
    return cached, full


def test_cache_matches_recompute_for_mixed_batch(stage2):
    config, params, batch = stage2
    cached, full = _both_ways(config, params, batch, Sampling(max_new_tokens=STEPS))
    assert np.abs(full.logits).max() > 1.0, "weights are not sharp enough for the test to mean anything"
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, atol=TOLERANCE, rtol=0)
    assert cached.logits.shape == (3, STEPS, config.text.vocab_size)


def test_cache_matches_recompute_without_image_input(stage2):
    """Text-only prompts with no pixel_values at all: textual learner and router, no visual learner."""
    config, params, _ = stage2
    batch = make_batch(config, [[9], [5]], seq_len=12)
    batch = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached, full = _both_ways(config, params, batch, Sampling(max_new_tokens=STEPS))
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, atol=TOLERANCE, rtol=0)


def test_cache_matches_recompute_scanned_stage1_sampled():
    """Scanned layers (the cache stacked over layers), stage 1, and sampling with the same keys."""
    config = config_for("causal", 1).replace(scan_layers=True)
    params = sharp_params(config)
    batch = make_batch(config, [[3, "img", 4], [6]], seq_len=24)
    sampling = Sampling(max_new_tokens=STEPS, temperature=0.8, top_k=20, top_p=0.9)
    cached, full = _both_ways(config, params, batch, sampling, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, atol=TOLERANCE, rtol=0)


def test_cache_matches_recompute_inside_the_system_prompt(stage2):
    """Prompts shorter than the system prompt: their first new tokens are no textual learner keys (they take
    no slot of its packed cache), the later ones are; also one-token prompts (a one-query prefill)."""
    config, params, _ = stage2
    assert config.wings.system_prompt_length == 3
    one_token = {k: v for k, v in make_batch(config, [[1], [1]], seq_len=1).items() if k != "pixel_values"}
    for batch in (make_batch(config, [[1], [2, "img", 1], [2]], seq_len=20), one_token):
        cached, full = _both_ways(config, params, batch, Sampling(max_new_tokens=STEPS))
        np.testing.assert_array_equal(cached.tokens, full.tokens)
        np.testing.assert_allclose(cached.logits, full.logits, atol=TOLERANCE, rtol=0)


def test_textual_cache_without_spare_slots(stage2, monkeypatch):
    """The textual learner's cache sized to exactly what the prompts' keys and the new tokens need."""
    config, params, batch = stage2
    monkeypatch.setattr(generate_module, "TEXT_CACHE_ROUNDING", 1)
    lengths = []
    real_prefill = generate_module._prefill
    monkeypatch.setattr(generate_module, "_prefill", lambda *args: lengths.append(args[-1]) or real_prefill(*args))
    cached, full = _both_ways(config, params, batch, Sampling(max_new_tokens=STEPS))
    # textual keys (text past the 3-token system prompt) per row: 3 + 2, 1 + 5, 4
    assert lengths == [6 + STEPS]
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("decode_chunk", [1, 2])
def test_decode_chunks_give_the_same_generation(stage2, decode_chunk):
    """Decode steps run ``decode_chunk`` at a time on the device: rows that stop inside a chunk or at its end,
    and the streaming callback, are as with one chunk for everything."""
    config, params, batch = stage2
    free = generate(config, params, batch, Sampling(max_new_tokens=STEPS))
    sampling = Sampling(max_new_tokens=STEPS, stop_tokens=(int(free.tokens[0, 2]), int(free.tokens[1, 3])))
    runs = []
    for chunk in (decode_chunk, STEPS):
        seen = []
        stream = lambda step, tokens, done, seen=seen: seen.append((step, tokens.copy(), done.copy()))
        runs.append((generate(config, params, batch, sampling, return_logits=True, decode_chunk=chunk,
                              on_token=stream), seen))
    (chunked, chunked_seen), (whole, whole_seen) = runs
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_array_equal(chunked.num_tokens, whole.num_tokens)
    np.testing.assert_array_equal(chunked.logits, whole.logits)
    assert [step for step, *_ in chunked_seen] == list(range(len(whole_seen)))
    for (_, tokens, done), (_, whole_tokens, whole_done) in zip(chunked_seen, whole_seen, strict=True):
        np.testing.assert_array_equal(tokens, whole_tokens)
        np.testing.assert_array_equal(done, whole_done)
    assert (chunked.num_tokens[:2] < STEPS).all()  # rows did stop early


def test_decode_reads_weights_and_caches_in_place(stage2):
    """The compiled decode loop copies no layer weights and no caches: scanned layers (weights sliced per
    layer), a cache read before its in-place write or laid out unlike its products would all copy them at
    every step (wings_jax.kv_cache); on CPU, whose layouts the cache's were chosen for. XLA:CPU before
    jax 0.9.2 lays the caches out otherwise and copies them (decoding is right, only slower)."""
    if jax.default_backend() != "cpu" or jax.__version_info__ < (0, 9, 2):
        pytest.skip("the cache layouts are chosen for XLA:CPU of jax 0.9.2 and later")
    config, params, batch = stage2
    config = config.replace(scan_layers=True)
    stacked = sharp_params(config)
    for rows in (1, 3):
        sampling = generate_module._Chooser.of(Sampling(max_new_tokens=STEPS))
        row_batch = {key: value[:rows] for key, value in batch.items()}
        logits, cache, state = generate_module._prefill(config, stacked, row_batch, 47, 39)
        carry = generate_module._Decoding(cache, state, jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool),
                                          jax.random.PRNGKey(0))
        decoder = generate_module._unstack_params(stacked["decoder"], config.text.num_layers)
        hlo = generate_module._decode_chunk.lower(
            config.replace(scan_layers=False), sampling, 4, False, {"decoder": decoder}, carry, jnp.int32(4),
        ).compile().as_text()
        shapes = {_hlo_shape(x) for x in jax.tree_util.tree_leaves((cache, decoder)) if x.ndim >= 2}
        assert {_hlo_shape(x) for x in jax.tree_util.tree_leaves(cache)} & {f"f32[{rows * 2},47,16]"}
        copies = [line.strip() for line in hlo.splitlines()
                  if any(f"= {shape}{{" in line for shape in shapes) and (" copy(" in line or "%copy" in line
                                                                         or "dynamic-slice" in line)]
        assert not copies, f"batch {rows}: " + "\n".join(copies[:5])


def _hlo_shape(x) -> str:
    assert x.dtype == jnp.float32
    return f"f32[{','.join(map(str, x.shape))}]"


def test_first_token_logits_equal_model_logits(stage2):
    """The prefill's logits are the full model's logits at each prompt's last token."""
    config, params, batch = stage2
    cached = generate(config, params, batch, Sampling(max_new_tokens=1), return_logits=True)
    logits = jax.jit(lambda p, b: WingsModel(config).apply({"params": p}, b, mode="logits"))(params, batch)
    last = batch["attention_mask"].sum(axis=1) - 1
    np.testing.assert_allclose(cached.logits[:, 0], np.asarray(logits)[np.arange(3), last], atol=TOLERANCE, rtol=0)


def test_stop_tokens_end_rows(stage2):
    config, params, batch = stage2
    free = generate(config, params, batch, Sampling(max_new_tokens=STEPS))
    stop = int(free.tokens[0, 2])
    stopped = generate(config, params, batch, Sampling(max_new_tokens=STEPS, stop_tokens=(stop,), pad_token=0))
    first_stop = [int(np.flatnonzero(np.append(row, stop) == stop)[0]) for row in free.tokens]
    for row, end in enumerate(first_stop):
        kept = min(end + 1, STEPS)
        assert stopped.num_tokens[row] == kept
        np.testing.assert_array_equal(stopped.tokens[row, :kept], free.tokens[row, :kept])
        assert (stopped.tokens[row, kept:] == 0).all()


def test_greedy_generate_keeps_its_contract(stage2):
    config, params, batch = stage2
    free = generate(config, params, batch, Sampling(max_new_tokens=STEPS))
    eos = int(free.tokens[1, 1])
    tokens = greedy_generate(WingsModel(config), params, batch, STEPS, eos)
    assert tokens.shape == (3, STEPS)
    end = int(np.flatnonzero(free.tokens[1] == eos)[0])
    np.testing.assert_array_equal(tokens[1, : end + 1], free.tokens[1, : end + 1])
    assert (tokens[1, end + 1:] == eos).all()


def test_streaming_callback_sees_every_step(stage2):
    config, params, batch = stage2
    seen = []
    result = generate(config, params, batch, Sampling(max_new_tokens=3),
                      on_token=lambda step, tokens, done: seen.append((step, tokens.copy())))
    assert [step for step, _ in seen] == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), result.tokens)


def test_reference_mode_generates_by_recompute_and_refuses_cache():
    config = config_for("reference", 2)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = make_batch(config, [[4, "img", 3]], seq_len=24)
    tokens = generate(config, params, batch, Sampling(max_new_tokens=2)).tokens
    assert tokens.shape == (1, 2)
    with pytest.raises(ValueError, match="mask_mode='causal'"):
        generate(config, params, batch, Sampling(max_new_tokens=2), method="cache")


def test_choose_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda **kw: np.stack([np.asarray(_choose(logits, k, **kw)) for k in keys[:200]])
    np.testing.assert_array_equal(_choose(logits, keys[0], 0.0, 0, 1.0), [0, 3])
    top2 = draw(temperature=1.0, top_k=2, top_p=1.0)
    assert set(top2[:, 0]) == {0, 1} and set(top2[:, 1]) == {3, 2}
    nucleus = draw(temperature=1.0, top_k=0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7: two tokens
    assert set(nucleus[:, 0]) == {0, 1} and set(nucleus[:, 1]) == {3, 2}
    everything = draw(temperature=1.0, top_k=0, top_p=1.0)
    assert set(everything[:, 0]) == {0, 1, 2, 3}
    np.testing.assert_array_equal(draw(temperature=1.0, top_k=0, top_p=0.01)[:, 0], 0)


def test_bad_arguments_are_named(stage2):
    config, params, batch = stage2
    with pytest.raises(ValueError, match="needs an rng key"):
        generate(config, params, batch, Sampling(temperature=1.0))
    with pytest.raises(ValueError, match="top_p"):
        generate(config, params, batch, Sampling(top_p=0.0))
    with pytest.raises(ValueError, match="decode_chunk"):
        generate(config, params, batch, Sampling(), decode_chunk=0)
    with pytest.raises(ValueError, match="router_positions"):
        generate(config, params, batch, Sampling(max_new_tokens=config.wings.router_positions))

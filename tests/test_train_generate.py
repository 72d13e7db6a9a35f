"""The minimal greedy generator used by the demo, against step-by-step argmax on unpadded prompts."""

import jax
import numpy as np

from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.generate import greedy_generate
from wings_jax.model import WingsModel, init_params
from wings_jax.presets import tiny_model

NEW_TOKENS = 4


def reference_continuation(model, params, sample: Sample, config) -> list[int]:
    """Argmax of the last position, appended, NEW_TOKENS times, each time on an exactly-sized batch."""
    ids = list(sample.token_ids)
    logits_fn = jax.jit(lambda batch: model.apply({"params": params}, batch, mode="logits"))
    out = []
    for _ in range(NEW_TOKENS):
        expanded = len(ids) + (config.image_tokens - 1) * len(sample.images)
        batch = pack_batch([Sample(ids, None, sample.images)], config, expanded)
        logits = logits_fn(batch)
        out.append(int(np.argmax(logits[0, -1])))
        ids.append(out[-1])
    return out


def test_greedy_generate_matches_step_by_step_argmax_and_stops_at_eos():
    config = tiny_model()
    params = init_params(config, jax.random.PRNGKey(3), seq_len=32)
    model = WingsModel(config)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (config.vision.image_size,) * 2 + (3,)).astype(np.float32)
    samples = [Sample([5, 6, IMAGE_PLACEHOLDER, 7], None, [image]), Sample([9, 10, 11, 12, 13, 14], None, [])]
    expected = [reference_continuation(model, params, s, config) for s in samples]
    # The first row's second token is the eos: from there on that row repeats it.
    eos_id = expected[0][1]
    expected = [stop_at(tokens, eos_id) for tokens in expected]
    batch = pack_batch(samples, config, 32)
    np.testing.assert_array_equal(greedy_generate(model, params, batch, NEW_TOKENS, eos_id), expected)


def stop_at(tokens: list[int], eos_id: int) -> list[int]:
    if eos_id not in tokens:
        return tokens
    end = tokens.index(eos_id) + 1
    return tokens[:end] + [eos_id] * (len(tokens) - end)

"""Parameter groups, freezing labels, per-group schedules and the weight-decay mask (no model needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.optim import (
    FROZEN,
    build_optimizer,
    decay_mask,
    merge,
    optimizer_labels,
    param_group,
    partition,
    warmup_cosine,
)


def wings_like_params():
    """A params tree with the Wings layout (shapes tiny and arbitrary)."""
    ones = lambda *shape: jnp.ones(shape, jnp.float32)
    return {
        "vision_tower": {"post_layernorm": {"scale": ones(4), "bias": ones(4)}},
        "projector": {"linear_0": {"kernel": ones(4, 3), "bias": ones(3)}},
        "decoder": {
            "embed_tokens": {"embedding": ones(5, 3)},
            "layers": {
                "input_layernorm": {"scale": ones(2, 3)},
                "visual_learner": {"q_a": {"kernel": ones(2, 3, 1)}},
                "textual_learner": {"q_a": {"kernel": ones(2, 3, 1)}},
                "router": {"kernel": ones(2, 8, 2), "bias": ones(2, 2)},
            },
            "norm": {"scale": ones(3)},
        },
    }


def test_param_group_names_each_part_of_wings():
    assert param_group(("vision_tower", "layers", "mlp", "fc1", "kernel")) == "vision_tower"
    assert param_group(("projector", "linear_1", "bias")) == "projector"
    assert param_group(("decoder", "layers_3", "visual_learner", "o_b", "kernel")) == "visual_learner"
    assert param_group(("decoder", "layers", "textual_learner", "q_a", "kernel")) == "textual_learner"
    assert param_group(("decoder", "layers", "router", "kernel")) == "router"
    assert param_group(("decoder", "lm_head", "kernel")) == "llm"
    with pytest.raises(ValueError, match="extra/w"):
        param_group(("extra", "w"))


def test_labels_freeze_untrained_groups_and_decay_skips_bias_and_scale():
    params = wings_like_params()
    labels = optimizer_labels(params, {"projector": 1.0, "visual_learner": 1.0})
    assert labels["vision_tower"]["post_layernorm"]["scale"] == FROZEN
    assert labels["projector"]["linear_0"]["kernel"] == "projector"
    assert labels["decoder"]["layers"]["visual_learner"]["q_a"]["kernel"] == "visual_learner"
    assert labels["decoder"]["layers"]["router"]["kernel"] == FROZEN
    assert labels["decoder"]["embed_tokens"]["embedding"] == FROZEN
    mask = decay_mask(params)
    assert mask["projector"]["linear_0"] == {"kernel": True, "bias": False}
    assert mask["decoder"]["norm"]["scale"] is False
    assert mask["decoder"]["embed_tokens"]["embedding"] is True


def test_partition_and_merge_round_trip():
    params = wings_like_params()
    labels = optimizer_labels(params, {"llm": 1.0})
    trainable, frozen = partition(params, labels)
    assert ("decoder", "norm", "scale") in trainable and ("projector", "linear_0", "bias") in frozen
    assert jax.tree.structure(merge(trainable, frozen)) == jax.tree.structure(params)


def test_build_optimizer_rejects_bad_groups():
    params = wings_like_params()
    with pytest.raises(ValueError, match="'vision_tower', which is always frozen"):
        build_optimizer(params, {"vision_tower": 1e-3}, 10, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown group 'lm'"):
        build_optimizer(params, {"lm": 1e-3}, 10, 0.0, 0.0)
    without_router = {**params, "decoder": {**params["decoder"], "layers": {
        k: v for k, v in params["decoder"]["layers"].items() if k != "router"}}}
    with pytest.raises(ValueError, match="trains 'router' but the model has no parameters in it"):
        build_optimizer(without_router, {"router": 1e-3}, 10, 0.0, 0.0)


def test_frozen_groups_hold_no_optimizer_state():
    params = wings_like_params()
    tx, _ = build_optimizer(params, {"projector": 1e-3, "visual_learner": 1e-3}, 10, 0.0, 0.0)
    state = tx.init(params)
    state_elements = sum(x.size for x in jax.tree.leaves(state))
    # Adam holds mu and nu per trained element, plus scalar step counters.
    trained = 4 * 3 + 3 + 2 * 3 * 1
    counters = sum(1 for x in jax.tree.leaves(state) if x.ndim == 0)
    assert state_elements - counters == 2 * trained


def test_warmup_cosine_shape():
    schedule = warmup_cosine(1e-3, total_steps=100, warmup_ratio=0.03)  # 3 warmup steps
    np.testing.assert_allclose([schedule(0), schedule(1), schedule(3)], [0.0, 1e-3 / 3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(schedule(3 + 97 // 2 + 0.5), 0.5e-3, rtol=1e-5)
    assert float(schedule(100)) == 0.0

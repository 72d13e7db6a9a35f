"""The train step on a tiny Wings: freezing, per-group learning rates, gradient accumulation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from train.optim import build_optimizer, optimizer_labels, param_group
from train.state import create_train_state
from train.step import make_train_step
from wings_jax.batch import IMAGE_PLACEHOLDER, Sample, pack_batch
from wings_jax.config import IGNORE_INDEX
from wings_jax.model import WingsModel, init_params
from wings_jax.presets import tiny_model

SEQ_LEN = 40


def random_batch(config, rng: np.random.Generator, rows: int) -> dict:
    """Rows with an image, a few text tokens and answers of different lengths (so per-row means differ)."""
    samples = []
    for row in range(rows):
        prompt = list(rng.integers(1, config.text.vocab_size, size=4))
        answer = list(rng.integers(1, config.text.vocab_size, size=2 + 3 * row))
        ids = prompt + [IMAGE_PLACEHOLDER] + answer
        labels = [IGNORE_INDEX] * (len(prompt) + 1) + answer
        image = rng.uniform(-1, 1, size=(config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
        samples.append(Sample(ids, labels, [image]))
    return pack_batch(samples, config, SEQ_LEN)


def run_steps(config, learning_rates, batches, grad_accum=1, weight_decay=0.0, loaded_params=None, adam_eps=1e-8):
    """Train from seed 0 (overlaid with ``loaded_params``); returns the initial params, the state after
    each step, the losses and the gradient norms."""
    model = WingsModel(config)
    params_shape = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), SEQ_LEN))
    tx, _ = build_optimizer(params_shape, learning_rates, total_steps=10, warmup_ratio=0.0,
                            weight_decay=weight_decay, max_grad_norm=1.0, eps=adam_eps)
    state = create_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN, loaded_params)
    initial = jax.device_get(state.params)
    states = []
    step = make_train_step(model, tx, optimizer_labels(params_shape, learning_rates), grad_accum)
    losses, grad_norms = [], []
    for batch in batches:
        state, metrics = step(state, batch)
        states.append(jax.device_get(state))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return initial, states, losses, grad_norms


def by_group(params) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        groups.setdefault(param_group(path), {})[path] = np.asarray(value)
    return groups


STAGE1_RATES = {"projector": 1e-2, "visual_learner": 1e-2}
STAGE2_RATES = {"projector": 1e-2, "visual_learner": 3e-3, "textual_learner": 3e-3, "router": 1e-3, "llm": 1e-4}


@pytest.fixture(scope="module")
def stage1_run():
    config = tiny_model(max_images=1)
    batch = random_batch(config, np.random.default_rng(0), 2)
    return run_steps(config, STAGE1_RATES, [batch] * 3, weight_decay=0.1)


@pytest.fixture(scope="module")
def stage2_setup():
    """A stage-2 model whose every parameter is random (zero-initialised learner factors would leave
    the router and the learners' first factors without gradient), a batch, and two steps on it."""
    config = tiny_model()
    config = config.replace(wings=dataclasses.replace(config.wings, stage=2))
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), SEQ_LEN))
    random_params = jax.tree.map(lambda x: rng.normal(0.0, 0.05, x.shape).astype(np.float32), shapes)
    batch = random_batch(config, rng, 4)
    return config, batch, random_params, run_steps(config, STAGE2_RATES, [batch, batch], loaded_params=random_params)


def test_frozen_params_are_bit_identical_and_trained_ones_move(stage1_run):
    initial, states, losses, _ = stage1_run
    state = states[-1]
    before, after = by_group(initial), by_group(state.params)
    for group in ("vision_tower", "llm", "textual_learner"):
        for path, value in before[group].items():
            np.testing.assert_array_equal(after[group][path], value, err_msg="/".join(path))
    for group in ("projector", "visual_learner"):
        moved = sum(not np.array_equal(after[group][p], v) for p, v in before[group].items())
        assert moved == len(before[group]), f"only {moved} of {len(before[group])} {group} params changed"
    assert losses[-1] < losses[0]
    assert int(state.step) == 3


def test_frozen_groups_have_no_optimizer_state(stage1_run):
    initial, states, _, _ = stage1_run
    state = states[-1]
    groups = by_group(initial)
    trained = sum(v.size for g in ("projector", "visual_learner") for v in groups[g].values())
    # Adam's mu and nu per trained element; the rest are scalar step counters.
    state_elements = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert state_elements == 2 * trained


def test_each_group_moves_by_its_own_learning_rate(stage2_setup):
    _, _, _, (initial, states, _, _) = stage2_setup
    before, after = by_group(initial), by_group(states[0].params)
    for group, lr in STAGE2_RATES.items():
        # Adam's first update is lr * g / (|g| + eps): lr wherever the gradient is not tiny.
        largest = max(np.abs(after[group][p] - v).max() for p, v in before[group].items())
        np.testing.assert_allclose(largest, lr, rtol=1e-3, err_msg=group)
    for path, value in before["vision_tower"].items():
        np.testing.assert_array_equal(after["vision_tower"][path], value)


def test_accumulating_micro_batches_equals_one_big_step(stage2_setup):
    config, batch, random_params, _ = stage2_setup
    # Rows hold 2, 5, 8, 11 label tokens, so the micro-batches' own means weigh tokens differently
    # from the whole batch's mean (the gradient norm would differ). Adam's eps is raised because with
    # 1e-8 its first update is lr * sign(g): a gradient entry near zero turns rounding (the two runs sum
    # in different orders) into a difference of up to 2 lr.
    run = functools.partial(run_steps, config, STAGE2_RATES, [batch, batch], loaded_params=random_params,
                            adam_eps=1e-3)
    initial, whole, whole_losses, whole_norms = run()
    _, accumulated, accumulated_losses, accumulated_norms = run(grad_accum=2)
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-6)
    np.testing.assert_allclose(accumulated_norms, whole_norms, rtol=1e-5)
    flat_whole, flat_initial = traverse_util.flatten_dict(whole[-1].params), traverse_util.flatten_dict(initial)
    moved = 0.0
    for path, value in traverse_util.flatten_dict(accumulated[-1].params).items():
        np.testing.assert_allclose(value, flat_whole[path], rtol=0, atol=1e-6, err_msg="/".join(path))
        moved = max(moved, float(np.abs(value - flat_initial[path]).max()))
    assert moved > 1e-4  # the runs did train: the comparison is not between two untouched states


def test_step_reports_the_batch_mean_loss_and_its_gradient_norm(stage2_setup):
    """The step divides by the batch's label count before differentiating: its loss and gradient norm
    equal those of the mean next-token cross-entropy, computed here from the logits."""
    config, batch, random_params, (initial, _, losses, grad_norms) = stage2_setup
    model = WingsModel(config)
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX

    def mean_loss(params):
        logits = model.apply({"params": params}, batch, method=WingsModel.logits)[:, :-1]
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), np.where(labelled, targets, 0)[..., None], -1)
        return -jnp.sum(picked[..., 0] * labelled) / labelled.sum()

    grads = traverse_util.flatten_dict(jax.grad(mean_loss)(initial))
    trained = [np.asarray(g) for path, g in grads.items() if param_group(path) in STAGE2_RATES]
    np.testing.assert_allclose(losses[0], float(mean_loss(initial)), rtol=1e-5)
    np.testing.assert_allclose(grad_norms[0], np.sqrt(sum(float(np.sum(g * g)) for g in trained)), rtol=1e-4)

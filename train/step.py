"""The jitted training step: gradients of the trainable parameters only, accumulated over micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.optim import merge, partition
from train.state import TrainState


def split_micro_batches(batch: Mapping[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
    """(B, ...) -> (grad_accum, B // grad_accum, ...): micro-batch i holds rows i, i + grad_accum, ...

    Strided, not consecutive, rows: a batch sharded over devices in consecutive blocks of rows then
    gives every micro-batch an equal share of every device's block, so each micro-batch stays spread
    over all devices and splitting moves no data between them.
    """
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum={grad_accum} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

    return {key: split(value) for key, value in batch.items()}


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    labels: Mapping,
    grad_accum: int = 1,
    state_sharding: Any = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted ``step(state, batch) -> (state, metrics)``.

    The loss is the sum of token losses over the whole batch divided by its label-token count, so
    ``grad_accum`` micro-batches give the same update as one step on the whole batch. Frozen
    parameters (label ``frozen``) are passed around the differentiation, so no gradient is computed
    for them, and are returned untouched (bit for bit). ``metrics``: loss, grad_norm (before
    clipping), num_tokens (label tokens). With ``state_sharding`` and ``batch_sharding`` (see
    ``sharding.Partitioner``) the step keeps the state's layout and returns replicated metrics.
    """

    def loss_sum(trainable, frozen, micro_batch):
        out = model.apply({"params": merge(trainable, frozen)}, micro_batch)
        return out["loss_sum"].astype(jnp.float32), out["num_tokens"]

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def accumulate(trainable, frozen, batch):
        if grad_accum == 1:
            (total, tokens), grads = grad_fn(trainable, frozen, batch)
            return grads, total, tokens

        def body(carry, micro_batch):
            grads_acc, total_acc, tokens_acc = carry
            (total, tokens), grads = grad_fn(trainable, frozen, micro_batch)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, total_acc + total, tokens_acc + tokens), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, tokens), _ = jax.lax.scan(body, init, split_micro_batches(batch, grad_accum))
        return grads, total, tokens

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trainable, frozen = partition(state.params, labels)
        grad_sums, total, tokens = accumulate(trainable, frozen, batch)
        denominator = jnp.maximum(tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, trainable)
        # Frozen groups map to set_to_zero, whose zero "gradients" XLA removes as dead code.
        frozen_grads = jax.tree.map(jnp.zeros_like, frozen)
        updates, opt_state = tx.update(merge(grads, frozen_grads), state.opt_state, state.params)
        trainable_updates, _ = partition(updates, labels)
        params = merge(optax.apply_updates(trainable, trainable_updates), frozen)
        metrics = {"loss": total / denominator, "grad_norm": optax.tree.norm(grads), "num_tokens": tokens}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    shardings = {}
    if state_sharding is not None:
        shardings = {"in_shardings": (state_sharding, batch_sharding), "out_shardings": (state_sharding, None)}
    return jax.jit(step, donate_argnums=(0,), **shardings)

"""The jitted training step: gradients of the trainable parameters only, accumulated over micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.optim import merge, partition
from train.state import TrainState
from wings_jax.model import count_label_tokens


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

    def loss(trainable, frozen, micro_batch, denominator):
        out = model.apply({"params": merge(trainable, frozen)}, micro_batch)
        return out["loss_sum"].astype(jnp.float32) / denominator

    grad_fn = jax.value_and_grad(loss)

    def accumulate(trainable, frozen, batch, denominator):
        """The whole batch's loss and its gradients, micro-batch by micro-batch. Each micro-batch's loss is
        divided by the whole batch's label count before differentiation, so the gradients need no pass
        of their own to be divided."""
        if grad_accum == 1:
            return grad_fn(trainable, frozen, batch, denominator)

        def body(carry, micro_batch):
            loss_acc, grads_acc = carry
            value, grads = grad_fn(trainable, frozen, micro_batch, denominator)
            return (loss_acc + value, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        (value, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                         split_micro_batches(batch, grad_accum))
        return value, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trainable, frozen = partition(state.params, labels)
        tokens = count_label_tokens(batch["labels"])
        value, grads = accumulate(trainable, frozen, batch, jnp.maximum(tokens, 1).astype(jnp.float32))
        # Frozen groups map to set_to_zero, whose zero "gradients" XLA removes as dead code.
        frozen_grads = jax.tree.map(jnp.zeros_like, frozen)
        updates, opt_state = tx.update(merge(grads, frozen_grads), state.opt_state, state.params)
        trainable_updates, _ = partition(updates, labels)
        params = merge(optax.apply_updates(trainable, trainable_updates), frozen)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "num_tokens": tokens}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    shardings = {}
    if state_sharding is not None:
        shardings = {"in_shardings": (state_sharding, batch_sharding), "out_shardings": (state_sharding, None)}
    return jax.jit(step, donate_argnums=(0,), **shardings)

"""Optimizer and freezing: parameter groups, per-group AdamW with warmup + cosine, clipping.

Every parameter belongs to one *group* named after the part of Wings it is in (``vision_tower``,
``projector``, ``visual_learner``, ``textual_learner``, ``router``, ``llm``). A training stage
gives a learning rate to each group it trains; every other group is frozen: it gets
``optax.set_to_zero()`` (no optimizer state) and is never differentiated (see ``partition``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import optax
from flax import traverse_util

GROUPS = ("vision_tower", "projector", "visual_learner", "textual_learner", "router", "llm")
ALWAYS_FROZEN = ("vision_tower",)
FROZEN = "frozen"
LEARNER_GROUPS = ("visual_learner", "textual_learner", "router")
# Parameter leaf names that never get weight decay: biases and normalisation scales.
NO_DECAY_LEAVES = ("bias", "scale")

Path = tuple[str, ...]


def param_group(path: Path) -> str:
    """The group of the parameter at ``path`` (a tuple of dict keys into the params tree)."""
    top = path[0]
    if top in ("vision_tower", "projector"):
        return top
    if top == "decoder":
        for name in LEARNER_GROUPS:
            if name in path:
                return name
        return "llm"
    raise ValueError(f"parameter {'/'.join(path)} belongs to no group; top-level keys must be one of "
                     "vision_tower, projector, decoder")


def _map_paths(fn: Callable[[Path], Any], params: Mapping) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: fn(path) for path in flat})


def groups_present(params: Mapping) -> set[str]:
    """The groups that hold at least one parameter of ``params``."""
    return {param_group(path) for path in traverse_util.flatten_dict(params)}


def check_learning_rates(learning_rates: Mapping[str, float], params: Mapping) -> None:
    """Raise ValueError if a trained group is unknown, always frozen, absent from the model, or has lr <= 0."""
    present = groups_present(params)
    for group, lr in learning_rates.items():
        if group not in GROUPS:
            raise ValueError(f"learning_rates names unknown group {group!r}; groups are {GROUPS}")
        if group in ALWAYS_FROZEN:
            raise ValueError(f"learning_rates names {group!r}, which is always frozen")
        if group not in present:
            raise ValueError(f"learning_rates trains {group!r} but the model has no parameters in it "
                             f"(groups present: {sorted(present)})")
        if not lr > 0:
            raise ValueError(f"learning_rates[{group!r}]={lr} must be > 0")


def optimizer_labels(params: Mapping, learning_rates: Mapping[str, float]) -> dict:
    """A params-shaped tree of optimizer labels: the group name where it is trained, else ``FROZEN``."""
    return _map_paths(lambda p: param_group(p) if param_group(p) in learning_rates else FROZEN, params)


def decay_mask(params: Mapping) -> dict:
    """A params-shaped tree of bools: True where weight decay applies (not on biases or norm scales)."""
    return _map_paths(lambda p: p[-1] not in NO_DECAY_LEAVES, params)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 over ceil(warmup_ratio * total_steps) steps, then cosine decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def build_optimizer(
    params: Mapping,
    learning_rates: Mapping[str, float],
    total_steps: int,
    warmup_ratio: float,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW per trained group (its own warmup + cosine schedule), frozen groups set to zero,
    after clipping by the global norm of all gradients. Returns (optimizer, schedules by group)."""
    check_learning_rates(learning_rates, params)
    schedules = {group: warmup_cosine(lr, total_steps, warmup_ratio) for group, lr in learning_rates.items()}
    transforms = {
        group: optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        for group, schedule in schedules.items()
    }
    transforms[FROZEN] = optax.set_to_zero()
    labels = optimizer_labels(params, learning_rates)
    tx = optax.multi_transform(transforms, labels)
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, schedules


def partition(params: Mapping, labels: Mapping) -> tuple[dict, dict]:
    """Split params into (trainable, frozen) flat dicts keyed by path, using ``optimizer_labels``."""
    flat_labels = traverse_util.flatten_dict(labels)
    trainable, frozen = {}, {}
    for path, value in traverse_util.flatten_dict(params).items():
        (frozen if flat_labels[path] == FROZEN else trainable)[path] = value
    return trainable, frozen


def merge(*parts: Mapping) -> dict:
    """Inverse of ``partition``: nested params from flat path-keyed dicts."""
    flat = {}
    for part in parts:
        flat.update(part)
    return traverse_util.unflatten_dict(flat)

"""Rematerialisation (gradient checkpointing) policies by name, shared by the vision tower and the decoder.

The names are ``wings_jax.config.REMAT_POLICIES``:

    none            no remat: keep every activation of the layer for the backward pass
    full            save nothing inside a layer; recompute it all in the backward pass
    dots            save the results of matrix multiplications
    dots_no_batch   save only matmul results without batch dimensions (weight-stationary dots)
    save_attention  save only the attention outputs tagged with ``ATTENTION_OUTPUT``
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from wings_jax.config import REMAT_POLICIES

# Attention modules tag their (batch, length, heads * head_dim) output with this name via
# ``jax.ad_checkpoint.checkpoint_name`` so that the ``save_attention`` policy can keep it.
ATTENTION_OUTPUT = "attention_output"


def remat_policy(name: str) -> Callable | None:
    """The ``jax.checkpoint_policies`` policy for ``name``, or None for ``none`` (meaning: do not remat).

    Note that None must not be passed on to ``nn.remat``, where it would mean "save nothing"; use
    ``maybe_remat`` to wrap a module class.
    """
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
    }
    if name not in policies:
        raise ValueError(f"remat_policy={name!r} is not one of {REMAT_POLICIES}")
    return policies[name]


def maybe_remat(module_cls: type[nn.Module], name: str, *, scanned: bool) -> type[nn.Module]:
    """``module_cls`` wrapped in ``nn.remat`` with the named policy, or unchanged for ``none``.

    ``scanned``: the layer runs inside ``nn.scan``, whose loop already keeps XLA from merging the
    recomputation with the forward pass, so common-subexpression prevention can be switched off.
    """
    policy = remat_policy(name)
    if policy is None:
        return module_cls
    return nn.remat(module_cls, policy=policy, prevent_cse=not scanned)

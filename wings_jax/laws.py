"""MLLM-Laws (spec section 5): how each layer's attention splits between the text before the image,
the image and the text after it, and the attention shift between the before- and after-image curves.

The masses come from ``WingsModel`` mode 'laws', which carries segment indicators as extra value
channels of the main attention (the probabilities are never materialised): for sample b, layer l and
segment V, ``mass[b, l, V] = sum over real queries i, keys j in V of P^l[i, j]``, heads averaged.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from wings_jax.config import ModelConfig
from wings_jax.model import WingsModel

SEGMENTS = ("before", "image", "after")


class LawsSummary(NamedTuple):
    shares: np.ndarray  # (n_layers, 3) mean over samples of each segment's share of a query's attention
    shift_per_sample: np.ndarray  # (S,) 1 - pearson(before, after) for every sample where it is defined
    attention_shift: float  # mean of shift_per_sample (nan when none is defined)


@functools.partial(jax.jit, static_argnames=("config",))
def _masses(config: ModelConfig, params, batch: dict):
    return WingsModel(config).apply({"params": params}, batch, mode="laws")


def segment_masses(config: ModelConfig, params, batch: dict) -> np.ndarray:
    """Per-layer attention mass on the (before, image, after) key segments: float32 (B, n_layers, 3)."""
    return np.asarray(_masses(config.replace(remat_policy="none"), params, batch))


def segment_shares(masses: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Masses divided by each sample's number of real queries: the mean fraction of one query's attention
    that lands on each segment, (B, n_layers, 3). Text between two images belongs to no segment, so the
    three shares add up to at most 1."""
    queries = np.asarray(attention_mask).sum(axis=1).astype(np.float64)
    return masses / np.maximum(queries, 1)[:, None, None]


def attention_shift(masses: np.ndarray) -> np.ndarray:
    """1 - pearson(LAWS_before, LAWS_after) over the layers, per sample (B,); nan where a curve is constant
    (e.g. a sample without text before or after its image), where the correlation is undefined."""
    before = masses[:, :, 0] - masses[:, :, 0].mean(axis=1, keepdims=True)
    after = masses[:, :, 2] - masses[:, :, 2].mean(axis=1, keepdims=True)
    norms = np.sqrt((before**2).sum(axis=1) * (after**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.where(norms > 0, (before * after).sum(axis=1) / norms, np.nan)
    return 1.0 - correlation


def summarise(shares: np.ndarray, masses: np.ndarray) -> LawsSummary:
    """Mean per-layer shares over samples (B, n_layers, 3) and the mean attention shift over the samples
    where it is defined."""
    shift = attention_shift(masses)
    defined = shift[np.isfinite(shift)]
    return LawsSummary(
        shares=shares.mean(axis=0),
        shift_per_sample=defined,
        attention_shift=float(defined.mean()) if defined.size else float("nan"),
    )


def plot_laws(summary: LawsSummary, path: str, title: str = "") -> None:
    """Save the three per-layer share curves (LAWS_before, LAWS_image, LAWS_after) as an image."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    layers = np.arange(1, summary.shares.shape[0] + 1)
    for index, name in enumerate(SEGMENTS):
        axis.plot(layers, summary.shares[:, index], marker="o", label=f"{name} image" if name != "image" else name)
    axis.set_xlabel("layer")
    axis.set_ylabel("attention share")
    axis.set_title(f"{title} attention shift = {summary.attention_shift:.4f}".strip())
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

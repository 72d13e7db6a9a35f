"""Model configuration: frozen dataclasses for the vision tower, projector, decoder and Wings learners.

Every dataclass is immutable and hashable, so it can be a Flax module attribute, and
round-trips through plain dicts (``to_dict`` / ``from_dict``) for JSON files and checkpoints.
``ModelConfig.validate`` checks the whole model once and names each bad field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

ATTENTION_BACKENDS = ("xla", "flash", "cpu_flash", "cudnn", "splash", "auto")
MASK_MODES = ("causal", "reference")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention")
ARCHITECTURES = ("qwen2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower. ``select_layer`` indexes HF ``hidden_states`` (0 = embeddings,
    i = output of encoder layer i, negative counts from the end); only the layers up to the
    selected one are built. The features are taken before ``post_layernorm``."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    select_layer: int = -2

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def kept_layers(self) -> int:
        """How many encoder layers are built and run (those after the selected one are dropped)."""
        return self.select_layer % (self.num_layers + 1)

    def validate(self) -> None:
        _check_divides("vision.num_heads", self.num_heads, "vision.hidden_size", self.hidden_size)
        # The patch conv is VALID: a remainder is dropped (SigLIP-so400m: 384 px = 27 patches of 14 + 6).
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} is smaller than vision.patch_size={self.patch_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"vision.select_layer={self.select_layer} is outside "
                f"[-{self.num_layers + 1}, {self.num_layers}] for vision.num_layers={self.num_layers}"
            )


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """``linear``, ``mlp{N}x_gelu`` (N Linear layers with exact GELU between) or ``identity``."""

    type: str = "mlp2x_gelu"

    @property
    def mlp_depth(self) -> int:
        """Number of Linear layers (0 for identity)."""
        if self.type == "identity":
            return 0
        if self.type == "linear":
            return 1
        match = re.fullmatch(r"mlp(\d+)x_gelu", self.type)
        if not match or int(match.group(1)) < 1:
            raise ValueError(
                f"projector.type={self.type!r} is not one of 'linear', 'identity', 'mlp<N>x_gelu' (N >= 1)"
            )
        return int(match.group(1))

    def validate(self) -> None:
        self.mlp_depth  # noqa: B018 - raises on an unknown type


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Qwen2 (q/k/v biases) or Llama decoder, in HF's terms."""

    architecture: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # llama3 scaling: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; stored as a sorted tuple of items to stay hashable.
    rope_scaling: tuple | None = None
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"text.architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        _check_divides("text.num_heads", self.num_heads, "text.hidden_size", self.hidden_size)
        _check_divides("text.num_kv_heads", self.num_kv_heads, "text.num_heads", self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"text head_dim={self.head_dim} (hidden_size / num_heads) must be even for RoPE")
        scaling = self.rope_scaling_dict
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"text.rope_scaling type {kind!r} is not supported (expected 'llama3' or None)")
            needed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing = sorted(needed - scaling.keys())
            if missing:
                raise ValueError(f"text.rope_scaling lacks {missing} for llama3 scaling")


@dataclasses.dataclass(frozen=True)
class WingsConfig:
    """The Wings learners and router (spec section 2) and their mask mode (spec section 3)."""

    enabled: bool = True  # False: a plain LLaVA model (the paper's baseline)
    stage: int = 1  # 1: visual learners only, no router; 2: both learners and the router
    lora_dim: int = 64
    learner_layers: tuple | None = None  # None: every decoder layer
    system_prompt_length: int = 14
    mask_mode: str = "causal"
    router_positions: int = 4096  # columns of the router weight: the longest key length it can route

    def has_learners(self, layer: int) -> bool:
        return self.enabled and (self.learner_layers is None or layer in self.learner_layers)

    def validate(self, text: TextConfig) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"wings.stage={self.stage} must be 1 or 2")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"wings.mask_mode={self.mask_mode!r} is not one of {MASK_MODES}")
        if not 0 < self.lora_dim <= text.hidden_size:
            raise ValueError(f"wings.lora_dim={self.lora_dim} must be in [1, text.hidden_size={text.hidden_size}]")
        if self.system_prompt_length < 0:
            raise ValueError(f"wings.system_prompt_length={self.system_prompt_length} must be >= 0")
        if self.router_positions < 1:
            raise ValueError(f"wings.router_positions={self.router_positions} must be >= 1")
        if self.learner_layers is not None:
            bad = [i for i in self.learner_layers if not 0 <= i < text.num_layers]
            if bad:
                raise ValueError(f"wings.learner_layers has {bad}, outside [0, text.num_layers={text.num_layers})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Wings model plus how it is computed (dtypes, scan, remat, attention backend)."""

    vision: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    text: TextConfig = TextConfig()
    wings: WingsConfig = WingsConfig()
    max_images: int = 1  # image slots per sample in a batch
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax and logits are always float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_backend: str = "xla"
    loss_chunk_size: int = 512  # sequence positions per chunk of the chunked cross-entropy

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    def validate(self) -> ModelConfig:
        self.vision.validate()
        self.projector.validate()
        self.text.validate()
        self.wings.validate(self.text)
        if self.max_images < 1:
            raise ValueError(f"max_images={self.max_images} must be >= 1")
        if self.wings.mask_mode == "reference" and self.max_images != 1:
            raise ValueError(f"max_images={self.max_images}: wings.mask_mode='reference' supports one image per sample")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        if self.scan_layers and self.wings.enabled and self.wings.learner_layers is not None:
            if tuple(sorted(self.wings.learner_layers)) != tuple(range(self.text.num_layers)):
                raise ValueError(
                    "wings.learner_layers selects a subset of layers, which needs scan_layers=False "
                    "(scanned layers must all have the same structure)"
                )
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 1")
        return self

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.text.rope_scaling is not None:
            out["text"]["rope_scaling"] = dict(self.text.rope_scaling)
        if self.wings.learner_layers is not None:
            out["wings"]["learner_layers"] = list(self.wings.learner_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; expected some of {sorted(known)}")
        parts = {"vision": VisionConfig, "projector": ProjectorConfig, "text": TextConfig, "wings": WingsConfig}
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _sub_from_dict(parts[key], key, value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _sub_from_dict(kind: type, name: str, data: dict):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {name} config fields {unknown}; expected some of {sorted(known)}")
    data = dict(data)
    if kind is TextConfig and data.get("rope_scaling") is not None:
        data["rope_scaling"] = tuple(sorted(data["rope_scaling"].items()))
    if kind is WingsConfig and data.get("learner_layers") is not None:
        data["learner_layers"] = tuple(data["learner_layers"])
    return kind(**data)


def _check_divides(small_name: str, small: int, big_name: str, big: int) -> None:
    if small < 1 or big % small:
        raise ValueError(f"{big_name}={big} is not divisible by {small_name}={small}")


def llama3_scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192):
    """The hashable ``rope_scaling`` value for Llama 3.1's llama3 RoPE scaling."""
    return tuple(
        sorted(
            {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }.items()
        )
    )

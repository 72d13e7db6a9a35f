"""The one declarative map between PyTorch (reference Wings / HF) tensor names and wings_jax param paths.

Each rule names a torch tensor, its wings_jax param path, the hook that turns one layout into the other,
and the torch shape in symbolic dimensions. ``tensor_specs`` expands the rules for a ``ModelConfig`` into
one ``TensorSpec`` per torch tensor; both conversion directions read that same list. Per-layer rules are
stacked on a leading axis of ``.../layers/...`` when layers are scanned, or land in ``.../layers_{i}/...``.
HF's rotate-half RoPE layout is kept, so q/k weights need no permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from wings_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Hook:
    """A layout change between torch and JAX: an axis permutation (None: the same layout)."""

    name: str
    to_jax_axes: tuple[int, ...] | None = None

    def to_jax(self, array: np.ndarray) -> np.ndarray:
        return array if self.to_jax_axes is None else array.transpose(self.to_jax_axes)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return array if self.to_jax_axes is None else array.transpose(np.argsort(self.to_jax_axes))

    def jax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        return torch_shape if self.to_jax_axes is None else tuple(torch_shape[a] for a in self.to_jax_axes)


COPY = Hook("copy")
LINEAR = Hook("linear", (1, 0))  # torch Linear weight (out, in) <-> Dense kernel (in, out)
CONV = Hook("conv", (2, 3, 1, 0))  # torch Conv2d weight (out, in, kh, kw) <-> flax Conv kernel (kh, kw, in, out)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One torch tensor <-> one param leaf. ``shape`` lists symbolic dims of the torch tensor
    (see ``_dims``); ``when`` keeps the rule only for configs where it returns True."""

    torch: str
    param: str
    hook: Hook
    shape: tuple[str, ...]
    when: Callable[[ModelConfig], bool] = lambda config: True


_has_bias = lambda config: config.text.attention_bias
_untied = lambda config: not config.text.tie_word_embeddings

LLM_RULES = (
    Rule("model.embed_tokens.weight", "decoder/embed_tokens/embedding", COPY, ("vocab", "d")),
    Rule("model.norm.weight", "decoder/norm/scale", COPY, ("d",)),
    Rule("lm_head.weight", "decoder/lm_head/kernel", LINEAR, ("vocab", "d"), _untied),
)

# Relative to "model.layers.{i}." and "decoder/layers[_{i}]/".
LLM_LAYER_RULES = (
    Rule("input_layernorm.weight", "input_layernorm/scale", COPY, ("d",)),
    Rule("post_attention_layernorm.weight", "post_attention_layernorm/scale", COPY, ("d",)),
    Rule("self_attn.q_proj.weight", "self_attn/q_proj/kernel", LINEAR, ("q", "d")),
    Rule("self_attn.q_proj.bias", "self_attn/q_proj/bias", COPY, ("q",), _has_bias),
    Rule("self_attn.k_proj.weight", "self_attn/k_proj/kernel", LINEAR, ("kv", "d")),
    Rule("self_attn.k_proj.bias", "self_attn/k_proj/bias", COPY, ("kv",), _has_bias),
    Rule("self_attn.v_proj.weight", "self_attn/v_proj/kernel", LINEAR, ("kv", "d")),
    Rule("self_attn.v_proj.bias", "self_attn/v_proj/bias", COPY, ("kv",), _has_bias),
    Rule("self_attn.o_proj.weight", "self_attn/o_proj/kernel", LINEAR, ("d", "q")),
    Rule("mlp.gate_proj.weight", "mlp/gate_proj/kernel", LINEAR, ("ff", "d")),
    Rule("mlp.up_proj.weight", "mlp/up_proj/kernel", LINEAR, ("ff", "d")),
    Rule("mlp.down_proj.weight", "mlp/down_proj/kernel", LINEAR, ("d", "ff")),
)

# torch module name -> wings_jax module name of the two learners.
LEARNERS = {"attn_pool": "visual_learner", "attn_t_pool": "textual_learner"}


def _learner_rules(torch_module: str, param_module: str) -> tuple[Rule, ...]:
    """`.0` is the d -> r factor (A, kernel (d, r)), `.1` the r -> d factor (B, kernel (r, d))."""
    rules = []
    for proj in "qkvo":
        rules.append(Rule(f"{torch_module}.{proj}_proj.0.weight", f"{param_module}/{proj}_a/kernel", LINEAR,
                          ("r", "d")))
        rules.append(Rule(f"{torch_module}.{proj}_proj.1.weight", f"{param_module}/{proj}_b/kernel", LINEAR,
                          ("d", "r")))
    return tuple(rules)


LEARNER_RULES = {param: _learner_rules(torch_name, param) for torch_name, param in LEARNERS.items()}

ROUTER_RULES = (
    Rule("reweight_module.linear.weight", "router/kernel", LINEAR, ("two", "router")),
    Rule("reweight_module.linear.bias", "router/bias", COPY, ("two",)),
)

# Relative to the vision prefix and "vision_tower/".
VISION_RULES = (
    Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", CONV,
         ("W", "channels", "patch", "patch")),
    Rule("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", COPY, ("W",)),
    Rule("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", COPY, ("patches", "W")),
    Rule("post_layernorm.weight", "post_layernorm/scale", COPY, ("W",)),
    Rule("post_layernorm.bias", "post_layernorm/bias", COPY, ("W",)),
)

# Relative to "{vision prefix}encoder.layers.{j}." and "vision_tower/layers[_{j}]/".
VISION_LAYER_RULES = (
    Rule("layer_norm1.weight", "layer_norm1/scale", COPY, ("W",)),
    Rule("layer_norm1.bias", "layer_norm1/bias", COPY, ("W",)),
    *(
        rule
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for rule in (
            Rule(f"self_attn.{proj}.weight", f"self_attn/{proj}/kernel", LINEAR, ("W", "W")),
            Rule(f"self_attn.{proj}.bias", f"self_attn/{proj}/bias", COPY, ("W",)),
        )
    ),
    Rule("layer_norm2.weight", "layer_norm2/scale", COPY, ("W",)),
    Rule("layer_norm2.bias", "layer_norm2/bias", COPY, ("W",)),
    Rule("mlp.fc1.weight", "mlp/fc1/kernel", LINEAR, ("Wff", "W")),
    Rule("mlp.fc1.bias", "mlp/fc1/bias", COPY, ("Wff",)),
    Rule("mlp.fc2.weight", "mlp/fc2/kernel", LINEAR, ("W", "Wff")),
    Rule("mlp.fc2.bias", "mlp/fc2/bias", COPY, ("W",)),
)

WINGS_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
HF_SIGLIP_VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "model.mm_projector."

# Components, in the order a conversion visits them and the summary lists them.
COMPONENTS = ("vision_tower", "projector", "llm", "visual_learner", "textual_learner", "router")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One torch tensor and where it lives in the wings_jax params.

    ``layer`` is the index on the leading stacked axis of a scanned leaf (of ``num_stacked``), None otherwise.
    """

    torch_name: str
    torch_shape: tuple[int, ...]
    param_path: str
    hook: Hook
    component: str
    layer: int | None = None
    num_stacked: int | None = None

    @property
    def jax_shape(self) -> tuple[int, ...]:
        """The shape of this tensor's slot in the param leaf (one layer of a stacked leaf)."""
        return self.hook.jax_shape(self.torch_shape)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """The shape of the whole param leaf (with the stacked layer axis when scanned)."""
        return self.jax_shape if self.layer is None else (self.num_stacked, *self.jax_shape)


def _dims(config: ModelConfig) -> dict[str, int]:
    text, vision = config.text, config.vision
    return {
        "vocab": text.vocab_size, "d": text.hidden_size, "q": text.num_heads * text.head_dim,
        "kv": text.num_kv_heads * text.head_dim, "ff": text.intermediate_size, "r": config.wings.lora_dim,
        "two": 2, "router": config.wings.router_positions, "W": vision.hidden_size,
        "Wff": vision.intermediate_size, "channels": vision.num_channels, "patch": vision.patch_size,
        "patches": vision.num_patches,
    }


def _expand(rules: Iterable[Rule], config: ModelConfig, component: str, torch_prefix: str, param_prefix: str,
            layer: int | None = None, num_stacked: int | None = None) -> list[TensorSpec]:
    dims = _dims(config)
    return [
        TensorSpec(torch_prefix + rule.torch, tuple(dims[d] for d in rule.shape), param_prefix + rule.param,
                   rule.hook, component, layer, num_stacked)
        for rule in rules
        if rule.when(config)
    ]


def _layer_param_prefix(root: str, index: int, scanned: bool) -> tuple[str, int | None]:
    """The param prefix of layer ``index`` and its index on the stacked axis (None when unrolled)."""
    return (f"{root}/layers/", index) if scanned else (f"{root}/layers_{index}/", None)


def llm_specs(config: ModelConfig) -> list[TensorSpec]:
    """The plain LLM's tensors (HF Qwen2 / Llama names), as in a Wings checkpoint or a ``save_pretrained`` one."""
    specs = _expand(LLM_RULES, config, "llm", "", "")
    scanned, layers = config.scan_layers, config.text.num_layers
    for i in range(layers):
        prefix, stack = _layer_param_prefix("decoder", i, scanned)
        specs += _expand(LLM_LAYER_RULES, config, "llm", f"model.layers.{i}.", prefix, stack, layers)
    return specs


def learner_specs(config: ModelConfig) -> list[TensorSpec]:
    """Both learners (whenever Wings is enabled) and, in stage 2, the router of every learner layer."""
    specs = []
    scanned, layers = config.scan_layers, config.text.num_layers
    for i in range(layers):
        if not config.wings.has_learners(i):
            continue
        prefix, stack = _layer_param_prefix("decoder", i, scanned)
        for param_module in LEARNERS.values():
            specs += _expand(LEARNER_RULES[param_module], config, param_module, f"model.layers.{i}.", prefix, stack,
                             layers)
        if config.wings.stage == 2:
            specs += _expand(ROUTER_RULES, config, "router", f"model.layers.{i}.", prefix, stack, layers)
    return specs


def projector_specs(config: ModelConfig) -> list[TensorSpec]:
    """``linear_{i}`` is torch ``mm_projector.{2i}`` (GELUs sit between); a ``linear`` projector is unindexed."""
    depth = config.projector.mlp_depth
    specs = []
    for i in range(depth):
        torch_prefix = PROJECTOR_PREFIX if config.projector.type == "linear" else f"{PROJECTOR_PREFIX}{2 * i}."
        in_dim = "W" if i == 0 else "d"
        rules = (
            Rule("weight", f"projector/linear_{i}/kernel", LINEAR, ("d", in_dim)),
            Rule("bias", f"projector/linear_{i}/bias", COPY, ("d",)),
        )
        specs += _expand(rules, config, "projector", torch_prefix, "")
    return specs


def vision_specs(config: ModelConfig, torch_prefix: str = WINGS_VISION_PREFIX) -> list[TensorSpec]:
    """The SigLIP tower up to the selected layer (the layers after it are not stored), plus post_layernorm."""
    specs = _expand(VISION_RULES, config, "vision_tower", torch_prefix, "vision_tower/")
    scanned, layers = config.scan_layers, config.vision.kept_layers
    for j in range(layers):
        prefix, stack = _layer_param_prefix("vision_tower", j, scanned)
        specs += _expand(VISION_LAYER_RULES, config, "vision_tower", f"{torch_prefix}encoder.layers.{j}.", prefix,
                         stack, layers)
    return specs


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a reference Wings checkpoint for ``config``, in conversion order."""
    specs = vision_specs(config) + projector_specs(config) + llm_specs(config)
    if config.wings.enabled:
        specs += learner_specs(config)
    return specs


def param_shapes(specs: Iterable[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """The param leaf shapes that ``specs`` fill, keyed by '/'-joined path."""
    return {spec.param_path: spec.leaf_shape for spec in specs}

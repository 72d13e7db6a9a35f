"""HF ``config.json`` <-> wings_jax config: the LLM (Qwen2 / Llama), the SigLIP tower and the Wings fields.

Parsing goes through the ``transformers`` config classes so that defaults omitted from a file and the
old (``rope_theta`` / ``rope_scaling``) and new (``rope_parameters``) RoPE spellings are read the same way.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import transformers

from convert.errors import ConversionError
from wings_jax.config import ARCHITECTURES, TextConfig, VisionConfig, llama3_scaling
from wings_jax.presets import VISION_PRESETS

log = logging.getLogger(__name__)

_CONFIG_CLASSES = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}
_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# Fields of the LLM's own config that an exported HF checkpoint keeps from the original file.
_KEPT_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
WINGS_SELECT_LAYER = -2  # Wings drops the tower's last layer and reads the one before it


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def detect_architecture(data: dict, source: str) -> str:
    """'qwen2' or 'llama' from ``model_type`` and ``architectures`` (also matches e.g. a Wings-Qwen2 class)."""
    names = [str(data.get("model_type", ""))] + [str(a) for a in data.get("architectures") or []]
    found = sorted({arch for arch in ARCHITECTURES for name in names if arch in name.lower()})
    if len(found) != 1:
        raise ConversionError(
            f"{source}: unknown LLM architecture (model_type={data.get('model_type')!r}, "
            f"architectures={data.get('architectures')}); expected a Qwen2 or Llama model"
        )
    return found[0]


def _rope(hf: transformers.PretrainedConfig, source: str) -> tuple[float, tuple | None]:
    """(rope_theta, wings_jax rope_scaling) from either spelling of the RoPE settings."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = {"rope_theta": hf.rope_theta, **(getattr(hf, "rope_scaling", None) or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(params["rope_theta"]), None
    if kind != "llama3":
        raise ConversionError(f"{source}: RoPE type {kind!r} is not supported (expected 'default' or 'llama3')")
    scaling = llama3_scaling(params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                             params["original_max_position_embeddings"])
    return float(params["rope_theta"]), scaling


def _parsed(config_class: type[transformers.PretrainedConfig], data: dict) -> transformers.PretrainedConfig:
    """``config_class.from_dict`` on a copy: transformers before 5.4 adds keys (``attn_implementation``) to
    the dict it is given, and the converters write the dict they read back out unchanged (torch_config.json),
    so a round trip must not see them."""
    return config_class.from_dict(copy.deepcopy(data))


def text_config_from_hf(data: dict, source: str) -> TextConfig:
    """The decoder described by an LLM ``config.json`` (a plain HF one or a Wings one)."""
    architecture = detect_architecture(data, source)
    hf = _parsed(_CONFIG_CLASSES[architecture], data)
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ConversionError(f"{source}: head_dim={head_dim} is not hidden_size / num_attention_heads")
    if getattr(hf, "mlp_bias", False):
        raise ConversionError(f"{source}: mlp_bias=True is not supported")
    rope_theta, rope_scaling = _rope(hf, source)
    return TextConfig(
        architecture=architecture, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        attention_bias=architecture == "qwen2" or bool(hf.attention_bias),
        tie_word_embeddings=bool(hf.tie_word_embeddings), max_position_embeddings=hf.max_position_embeddings,
    )


def hf_text_config(text: TextConfig, original: dict | None = None) -> dict:
    """A ``config.json`` for the LLM alone that ``transformers`` loads as Qwen2ForCausalLM / LlamaForCausalLM.

    Token ids are kept from ``original`` (the LLM's or Wings' config) when given.
    """
    kwargs = dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads,
        rms_norm_eps=text.rms_norm_eps, rope_theta=text.rope_theta, rope_scaling=text.rope_scaling_dict,
        tie_word_embeddings=text.tie_word_embeddings, max_position_embeddings=text.max_position_embeddings,
    )
    if text.architecture == "llama":
        kwargs.update(attention_bias=text.attention_bias, head_dim=text.head_dim)
    elif not text.attention_bias:
        raise ConversionError("a qwen2 decoder without attention biases cannot be written as a HF Qwen2 checkpoint")
    kwargs.update({k: original[k] for k in _KEPT_TOKEN_FIELDS if original and original.get(k) is not None})
    data = _CONFIG_CLASSES[text.architecture](**kwargs).to_dict()
    data["architectures"] = [_HF_ARCHITECTURES[text.architecture]]
    return data


def vision_config_from_hf(data: dict, source: str) -> VisionConfig:
    """The SigLIP tower of a HF ``SiglipConfig`` (its ``vision_config``) or ``SiglipVisionConfig``."""
    data = data.get("vision_config", data)
    hf = _parsed(transformers.SiglipVisionConfig, data)
    if hf.hidden_act != "gelu_pytorch_tanh":
        raise ConversionError(f"{source}: vision hidden_act={hf.hidden_act!r}; wings_jax's SigLIP uses "
                              "'gelu_pytorch_tanh'")
    return VisionConfig(
        hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, image_size=hf.image_size, patch_size=hf.patch_size,
        num_channels=hf.num_channels, layer_norm_eps=hf.layer_norm_eps, select_layer=WINGS_SELECT_LAYER,
    )


def resolve_vision_config(mm_vision_tower: str | None, override: Path | None) -> VisionConfig:
    """The tower's architecture: ``override`` (a HF SigLIP config.json), else ``mm_vision_tower`` as a local
    folder with a config.json, else as the name of a known preset (e.g. google/siglip-so400m-patch14-384)."""
    if override is not None:
        return vision_config_from_hf(read_json(override), str(override))
    if mm_vision_tower:
        folder = Path(mm_vision_tower)
        if (folder / "config.json").is_file():
            return vision_config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
        preset = mm_vision_tower.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "_")
        if preset in VISION_PRESETS:
            return VISION_PRESETS[preset]
    raise ConversionError(
        f"cannot tell the vision tower's architecture from mm_vision_tower={mm_vision_tower!r}: it is neither a "
        f"folder with a config.json nor one of the presets {sorted(VISION_PRESETS)}; pass --vision-config FILE "
        "(a HF SigLIP config.json)"
    )


def reference_config(llm_config: dict, vision: VisionConfig, vision_tower: str, projector_type: str, lora_dim: int,
                     system_prompt_length: int) -> dict:
    """A reference Wings ``config.json``: the LLM's config plus the ``mm_*`` and learner fields."""
    return {
        **llm_config,
        "mm_vision_tower": vision_tower,
        "mm_projector_type": projector_type,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": WINGS_SELECT_LAYER,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "lora_dim": lora_dim,
        "system_prompt_length": system_prompt_length,
        "image_token_length": vision.num_patches,
    }

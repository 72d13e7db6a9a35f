"""Named model presets: released architectures and tiny ones for tests and the demo."""

from __future__ import annotations

from wings_jax.config import ModelConfig, TextConfig, VisionConfig, WingsConfig, llama3_scaling

SIGLIP_SO400M_384 = VisionConfig(
    hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=384, patch_size=14,
    layer_norm_eps=1e-6, select_layer=-2,
)

QWEN1_5_7B_CHAT = TextConfig(
    architecture="qwen2", vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=True,
    tie_word_embeddings=False, max_position_embeddings=32768,
)

QWEN2_5_7B_INSTRUCT = TextConfig(
    architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=True,
    tie_word_embeddings=False, max_position_embeddings=32768,
)

LLAMA3_1_8B_INSTRUCT = TextConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=llama3_scaling(),
    attention_bias=False, tie_word_embeddings=False, max_position_embeddings=131072,
)

TINY_VISION = VisionConfig(
    hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=28, patch_size=7,
    layer_norm_eps=1e-6, select_layer=-2,
)

TINY_QWEN2 = TextConfig(
    architecture="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=10_000.0, attention_bias=True, tie_word_embeddings=False,
    max_position_embeddings=512,
)

TINY_LLAMA = TextConfig(
    architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500_000.0,
    rope_scaling=llama3_scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=32),
    attention_bias=False, tie_word_embeddings=True, max_position_embeddings=512,
)

TEXT_PRESETS = {
    "qwen1_5_7b_chat": QWEN1_5_7B_CHAT,
    "qwen2_5_7b_instruct": QWEN2_5_7B_INSTRUCT,
    "llama3_1_8b_instruct": LLAMA3_1_8B_INSTRUCT,
    "tiny_qwen2": TINY_QWEN2,
    "tiny_llama": TINY_LLAMA,
}
VISION_PRESETS = {"siglip_so400m_patch14_384": SIGLIP_SO400M_384, "tiny_siglip": TINY_VISION}


def wings_model(text: str = "qwen1_5_7b_chat", vision: str = "siglip_so400m_patch14_384", **overrides) -> ModelConfig:
    """A Wings model from named text and vision presets (the released recipe's learner settings)."""
    if text not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {text!r}; expected one of {sorted(TEXT_PRESETS)}")
    if vision not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {vision!r}; expected one of {sorted(VISION_PRESETS)}")
    config = ModelConfig(vision=VISION_PRESETS[vision], text=TEXT_PRESETS[text], wings=WingsConfig())
    return config.replace(**overrides).validate()


def tiny_model(text: str = "tiny_qwen2", **overrides) -> ModelConfig:
    """A tiny random-weight Wings model for tests and the demo (16 image tokens of width 32)."""
    config = ModelConfig(
        vision=TINY_VISION, text=TEXT_PRESETS[text], wings=WingsConfig(lora_dim=8, system_prompt_length=3,
                                                                        router_positions=512),
    )
    return config.replace(**overrides).validate()

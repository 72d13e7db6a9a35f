"""The small benchmark model: a 4-layer Qwen2-style decoder (width 512, 8 heads, 4 key/value heads,
MLP 1408, vocab 4096) with learners of rank 8 on every layer, a tiny SigLIP (width 32, 3 layers,
378 px at patch 14: 729 image tokens), float32, stage 2 (the released recipe's trained groups).

    python -m bench.train_step --config configs/bench_small.py --config.seq_len=2048
"""

import ml_collections

from train.recipe import RELEASED_STAGES
from wings_jax.config import ModelConfig, TextConfig, VisionConfig, WingsConfig


def get_config(arg=None):
    del arg
    model = ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=128, num_layers=3, num_heads=4, image_size=378,
                            patch_size=14),
        text=TextConfig(architecture="qwen2", vocab_size=4096, hidden_size=512, intermediate_size=1408,
                        num_layers=4, num_heads=8, num_kv_heads=4, rope_theta=1_000_000.0,
                        max_position_embeddings=8192),
        wings=WingsConfig(stage=2, lora_dim=8, router_positions=4096),
        dtype="float32", param_dtype="float32", remat_policy="none", attention_backend="auto",
        # Four layers unrolled: the scan's stacking of every layer's residuals cost 5 % of the step on CPU
        # (the 32-layer compile-time benchmark scans). Loss chunks of 2048 positions: with this vocabulary
        # their logits are 32 MiB, and up to L = 2048 the backward needn't recompute them.
        scan_layers=False, loss_chunk_size=2048,
    ).validate()
    config = ml_collections.ConfigDict()
    config.model = model.to_dict()
    config.seq_len = 1024  # one image of 729 tokens plus text
    config.batch_size = 1
    config.learning_rates = dict(RELEASED_STAGES[2]["learning_rates"])
    config.warmup_steps = 2  # untimed steps after compilation
    config.steps = 10  # timed steps
    config.seed = 0
    return config

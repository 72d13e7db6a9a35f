"""The LLaVA-1.5 baseline (no Wings learners) on Qwen1.5-7B-Chat + SigLIP-so400m, stage 2: projector + LLM.

    python -m train.main --workdir DIR \
        --config configs/llava_baseline_stage2.py:data=PATH.json,images=DIR,tokenizer=DIR,init_from=DIR
"""

from train.recipe import released_recipe


def get_config(arg=None):
    return released_recipe(arg, "qwen1_5_7b_chat", "qwen", wings_stage=2, wings_enabled=False)

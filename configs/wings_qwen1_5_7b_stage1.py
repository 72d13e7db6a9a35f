"""Wings on Qwen1.5-7B-Chat + SigLIP-so400m, stage 1:
the projector and visual learners on captions (e.g. LLaVA-Pretrain 558K).

    python -m train.main --workdir DIR \
        --config configs/wings_qwen1_5_7b_stage1.py:data=PATH.json,images=DIR,tokenizer=DIR,init_from=DIR

``init_from``: a converted checkpoint of the LLM + SigLIP.
"""

from train.recipe import released_recipe


def get_config(arg=None):
    return released_recipe(arg, "qwen1_5_7b_chat", "qwen", wings_stage=1)

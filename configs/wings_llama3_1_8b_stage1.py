"""Wings on Llama-3.1-8B-Instruct + SigLIP-so400m, stage 1:
the projector and visual learners on captions (e.g. LLaVA-Pretrain 558K).

    python -m train.main --workdir DIR \
        --config configs/wings_llama3_1_8b_stage1.py:data=PATH.json,images=DIR,tokenizer=DIR,init_from=DIR

``init_from``: a converted checkpoint of the LLM + SigLIP.
"""

from train.recipe import released_recipe


def get_config(arg=None):
    return released_recipe(arg, "llama3_1_8b_instruct", "llama3", wings_stage=1)

"""Wings on Qwen1.5-7B-Chat + SigLIP-so400m, stage 2:
learners, router and projector at 1e-5, the LLM at 2e-6 (e.g. on LLaVA mix665K).

    python -m train.main --workdir DIR \
        --config configs/wings_qwen1_5_7b_stage2.py:data=PATH.json,images=DIR,tokenizer=DIR,init_from=DIR

``init_from``: a stage-1 run directory or a converted stage-1 checkpoint.
"""

from train.recipe import released_recipe


def get_config(arg=None):
    return released_recipe(arg, "qwen1_5_7b_chat", "qwen", wings_stage=2)

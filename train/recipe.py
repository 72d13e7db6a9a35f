"""The training config: defaults shared by the recipes in configs/, and its validation.

A config (an ``ml_collections.ConfigDict``) holds the model (``config.model``: every
``wings_jax.config.ModelConfig`` field, so any can be overridden with ``--config.model.x.y=...``),
the mesh and rules that place the run on the devices (``config.sharding``, see
``sharding.config.default_sharding_config``: e.g. ``--config.sharding.mesh.tensor=2``) and one
sub-config per training stage (``config.stage1``, ``config.stage2``, ...); ``config.stages`` lists,
comma-separated, the stages to run in order. A stage sets the Wings stage, where its parameters
come from, its data, and its optimisation.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from sharding.config import default_sharding_config
from train.data import default_data_config, validate_data_config
from train.optim import ALWAYS_FROZEN, GROUPS, LEARNER_GROUPS
from wings_jax.config import ModelConfig

# Model fields that set how the model is computed, not what it is: a recipe's values for these
# apply on top of a converted checkpoint's own config.
COMPUTE_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat_policy", "attention_backend", "loss_chunk_size")
# -1 in model.text.vocab_size / model.wings.system_prompt_length: take the value from the tokenizer.
FROM_TOKENIZER = -1
PREVIOUS_STAGE = "previous"
WORKDIR_MARK = "{workdir}"
STAGE_DATA_FIELDS = ("seq_len", "batch_size", "num_epochs")
TRAINABLE_GROUPS = tuple(group for group in GROUPS if group not in ALWAYS_FROZEN)


class ConfigError(ValueError):
    """The training config is invalid; the message lists every bad field."""


def base_config(model: ModelConfig) -> ml_collections.ConfigDict:
    """The top-level defaults around ``model`` (its fields become ``config.model``)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model.to_dict()
    config.tokenizer = ""  # a Hugging Face tokenizer directory ('{workdir}' stands for the workdir)
    config.init_from = ""  # a converted checkpoint directory for the first stage ('' = random init)
    config.stages = "stage1"
    config.sharding = default_sharding_config()  # FSDP over every device unless overridden
    return config


def stage_config(
    wings_stage: int,
    learning_rates: dict[str, float],
    data: ml_collections.ConfigDict,
    batch_size: int,
    num_steps: int = -1,
    **overrides,
) -> ml_collections.ConfigDict:
    """One training stage. ``num_steps=-1``: ``num_epochs`` passes over the data (see ``data_config``)."""
    stage = ml_collections.ConfigDict()
    stage.wings_stage = wings_stage
    # '' : config.init_from for the first stage; 'previous': the previous stage's last checkpoint;
    # or a directory: a converted checkpoint or a stage's checkpoint directory (params only).
    stage.init_from = ""
    stage.data = data
    stage.seq_len = 2048
    stage.batch_size = batch_size  # rows per optimizer step (all micro-batches, all devices)
    stage.grad_accum = 1  # micro-batches per step
    stage.num_steps = num_steps
    stage.num_epochs = 1
    # Peak learning rate of every trainable group; 0 freezes it (so --config.stageN.learning_rates.llm=1e-5
    # can unfreeze a group from the command line). The vision tower is always frozen.
    stage.learning_rates = {group: 0.0 for group in TRAINABLE_GROUPS}
    unknown = sorted(set(learning_rates) - set(TRAINABLE_GROUPS))
    if unknown:
        raise ConfigError(f"learning_rates names {unknown}, not trainable groups; expected some of {TRAINABLE_GROUPS}")
    stage.learning_rates.update(learning_rates)
    stage.warmup_ratio = 0.03
    stage.weight_decay = 0.0
    stage.b1 = 0.9
    stage.b2 = 0.999
    stage.eps = 1e-8
    stage.max_grad_norm = 1.0
    stage.save_every = 500
    stage.keep_checkpoints = 2
    stage.async_checkpoints = True
    stage.update(overrides)
    return stage


def data_config(sources: list[dict], **overrides) -> ml_collections.ConfigDict:
    """A stage's data: ``train.data.default_data_config()`` without the fields the stage sets
    (seq_len, batch_size: from the stage; num_epochs: the stage stops after its steps).

    ``sources``: ``[{path, kind, image_root, weight, ...}]``; '{workdir}' in a path or image_root
    stands for the run's workdir.
    """
    data = default_data_config()
    for key in STAGE_DATA_FIELDS:
        del data[key]
    data.sources = [dict(source) for source in sources]
    data.update(overrides)
    return data


def runtime_data_config(stage: ml_collections.ConfigDict, workdir: str, process_count: int = 1):
    """The data config ``train.data.make_train_iterator`` takes: the stage's, with seq_len, the
    per-process batch size, endless epochs, and '{workdir}' substituted."""
    data = ml_collections.ConfigDict(stage.data.to_dict())  # an unlocked copy
    data.seq_len = stage.seq_len
    data.batch_size = stage.batch_size // process_count
    data.num_epochs = None
    data.sources = [
        {key: value.replace(WORKDIR_MARK, workdir) if isinstance(value, str) else value for key, value in spec.items()}
        for spec in data.sources
    ]
    return data


def parse_args(arg: str | None) -> dict[str, str]:
    """'key=value,key=value' (the part after ':' in ``--config file.py:...``) -> dict."""
    if not arg:
        return {}
    out = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config argument {item!r} is not key=value (in {arg!r})")
        out[key.strip()] = value.strip()
    return out


def trained_groups(stage: ml_collections.ConfigDict) -> dict[str, float]:
    """The groups a stage trains, with their peak learning rates."""
    return {group: float(lr) for group, lr in stage.learning_rates.items() if lr > 0}


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    return [name.strip() for name in config.stages.split(",") if name.strip()]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check the whole config once, before anything runs; raise ConfigError listing every bad field.

    Paths under '{workdir}' (written by the run, e.g. the demo data) are not checked for existence.
    """
    errors = []
    names = stage_names(config)
    if not names:
        errors.append("stages: empty; name at least one stage sub-config, e.g. 'stage1'")
    for index, name in enumerate(names):
        if name not in config:
            errors.append(f"stages: names {name!r}, which is not a sub-config of this config")
            continue
        errors += [f"{name}.{e}" for e in _stage_errors(config[name], index == 0, config.model.wings.enabled)]
    try:
        model_config_from(config, None)
    except (ValueError, TypeError) as error:
        errors.append(f"model: {error}")
    if not config.tokenizer:
        errors.append("tokenizer: empty; give a Hugging Face tokenizer directory")
    elif WORKDIR_MARK not in config.tokenizer and not os.path.isdir(config.tokenizer):
        errors.append(f"tokenizer: {config.tokenizer!r} is not a directory")
    if config.init_from and not os.path.isdir(config.init_from):
        errors.append(f"init_from: {config.init_from!r} is not a directory")
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


def _stage_errors(stage: ml_collections.ConfigDict, first: bool, wings_enabled: bool) -> list[str]:
    errors = []
    absent = set(LEARNER_GROUPS) if not wings_enabled else {"router"} if stage.wings_stage == 1 else set()
    for group in sorted(absent & set(trained_groups(stage))):
        errors.append(f"learning_rates.{group}: the model has no {group} "
                      f"({'wings.enabled=False' if not wings_enabled else 'Wings stage 1'}); set it to 0")
    if stage.wings_stage not in (1, 2):
        errors.append(f"wings_stage: {stage.wings_stage}, expected 1 or 2")
    if stage.init_from == PREVIOUS_STAGE and first:
        errors.append("init_from: 'previous' in the first stage run (no previous stage)")
    elif stage.init_from not in ("", PREVIOUS_STAGE) and not os.path.isdir(stage.init_from):
        errors.append(f"init_from: {stage.init_from!r} is not a directory")
    for key in ("batch_size", "grad_accum", "seq_len", "save_every", "keep_checkpoints"):
        if stage[key] < 1:
            errors.append(f"{key}: {stage[key]}, expected >= 1")
    if stage.grad_accum >= 1 and stage.batch_size % stage.grad_accum:
        errors.append(f"batch_size: {stage.batch_size} is not divisible by grad_accum={stage.grad_accum}")
    if stage.num_steps == -1:
        if stage.num_epochs < 1:
            errors.append(f"num_epochs: {stage.num_epochs}, expected >= 1 when num_steps=-1")
    elif stage.num_steps < 1:
        errors.append(f"num_steps: {stage.num_steps}, expected >= 1 (or -1 for num_epochs passes over the data)")
    for group, lr in stage.learning_rates.items():
        if group not in TRAINABLE_GROUPS:
            errors.append(f"learning_rates.{group}: not a trainable group; expected some of {TRAINABLE_GROUPS}")
        elif not lr >= 0:
            errors.append(f"learning_rates.{group}: {lr}, expected >= 0 (0: frozen)")
    if not trained_groups(stage):
        errors.append("learning_rates: all 0; a stage must train at least one group")
    if not 0 <= stage.warmup_ratio <= 1:
        errors.append(f"warmup_ratio: {stage.warmup_ratio}, expected in [0, 1]")
    if stage.weight_decay < 0:
        errors.append(f"weight_decay: {stage.weight_decay}, expected >= 0")
    for key in STAGE_DATA_FIELDS:
        if key in stage.data:
            errors.append(f"data.{key}: set by the stage ({'stage.' + key if key != 'num_epochs' else 'num_steps'})")
    try:
        validate_data_config(runtime_data_config(stage, WORKDIR_MARK))
    except ValueError as error:
        errors.append(str(error))
    for index, source in enumerate(stage.data.sources):
        path = source.get("path", "")
        if path and source.get("kind") != "tfds" and WORKDIR_MARK not in path and not os.path.isfile(path):
            errors.append(f"data.sources[{index}].path: {path!r} is not a file")
    return errors


def model_config_from(config: ml_collections.ConfigDict, stage_name: str | None, tokenizer_values: dict | None = None,
                      base: ModelConfig | None = None) -> ModelConfig:
    """The model of one stage, validated.

    ``config.model`` (or ``base``, a converted checkpoint's config, with the recipe's compute fields
    on top), the stage's Wings stage, and ``tokenizer_values`` ({'vocab_size', 'system_prompt_length'})
    where the config says -1. Without ``tokenizer_values``, those fields are validated with a stand-in.
    """
    model = ModelConfig.from_dict(config.model.to_dict())
    if base is not None:
        model = base.replace(**{name: getattr(model, name) for name in COMPUTE_FIELDS})
    if stage_name is not None:
        model = model.replace(wings=dataclasses.replace(model.wings, stage=config[stage_name].wings_stage))
    values = tokenizer_values or {"vocab_size": 1, "system_prompt_length": 0}
    if model.text.vocab_size == FROM_TOKENIZER:
        model = model.replace(text=dataclasses.replace(model.text, vocab_size=values["vocab_size"]))
    if model.wings.system_prompt_length == FROM_TOKENIZER:
        wings = dataclasses.replace(model.wings, system_prompt_length=values["system_prompt_length"])
        model = model.replace(wings=wings)
    return model.validate()


# The released recipe (spec section 4) per stage: trained groups and learning rates, global batch,
# gradient accumulation (8 devices x per-device batch x accumulation) and weight decay.
RELEASED_STAGES = {
    1: dict(learning_rates={"projector": 2e-5, "visual_learner": 2e-5}, batch_size=256, grad_accum=4,
            weight_decay=1e-9),
    2: dict(learning_rates={"projector": 1e-5, "visual_learner": 1e-5, "textual_learner": 1e-5, "router": 1e-5,
                            "llm": 2e-6},
            batch_size=64, grad_accum=2, weight_decay=1e-8),
}
# The LLaVA-1.5 baseline: the projector alone, then projector + LLM.
LLAVA_STAGES = {
    1: dict(learning_rates={"projector": 1e-3}, batch_size=256, grad_accum=4, weight_decay=0.0),
    2: dict(learning_rates={"projector": 2e-5, "llm": 2e-5}, batch_size=128, grad_accum=4, weight_decay=0.0),
}
RECIPE_ARGS = ("data", "images", "tokenizer", "init_from")


def released_recipe(arg: str | None, text_preset: str, template: str, wings_stage: int,
                    wings_enabled: bool = True) -> ml_collections.ConfigDict:
    """One stage of a full-size recipe: SigLIP-so400m + ``text_preset``, bf16 compute with float32
    parameters, full remat, sequences of 2048, one epoch, warmup 3 % + cosine, clipping at 1.0.

    ``arg`` (after ':' in ``--config``): ``data=<LLaVA JSON/JSONL>,images=<image root>,
    tokenizer=<HF tokenizer dir>,init_from=<converted checkpoint or stage-1 run directory>``.
    """
    from wings_jax.presets import wings_model

    args = parse_args(arg)
    unknown = sorted(set(args) - set(RECIPE_ARGS))
    if unknown:
        raise ConfigError(f"unknown recipe arguments {unknown}; expected some of {list(RECIPE_ARGS)}")
    model = wings_model(text_preset, dtype="bfloat16", param_dtype="float32", remat_policy="full")
    model = model.replace(wings=dataclasses.replace(model.wings, enabled=wings_enabled,
                                                    system_prompt_length=FROM_TOKENIZER))
    config = base_config(model)
    config.tokenizer = args.get("tokenizer", "")
    config.init_from = args.get("init_from", "")
    name = f"stage{wings_stage}"
    config.stages = name
    path = args.get("data", "")
    kind = "jsonl" if path.endswith(".jsonl") else "json"
    source = {"path": path, "kind": kind, "image_root": args.get("images", "")}
    settings = (RELEASED_STAGES if wings_enabled else LLAVA_STAGES)[wings_stage]
    config[name] = stage_config(wings_stage=wings_stage, data=data_config([source], template=template),
                                seq_len=2048, num_steps=-1, num_epochs=1, warmup_ratio=0.03, max_grad_norm=1.0,
                                save_every=1000, **settings)
    return config

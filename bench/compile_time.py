"""Compile time of a full-size training step, from abstract parameters (nothing is allocated).

    python -m bench.compile_time [--text=qwen1_5_7b_chat] [--seq_len=2048] [--remat=full] [--no_scan]

The released recipe's model (SigLIP-so400m + the text preset, bf16 compute, float32 parameters),
Wings stage 2 with its trained groups; the state comes from ``jax.eval_shape``, so the step is
traced, lowered and compiled for this machine without any weights.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from absl import app, flags

from bench import common
from train.optim import build_optimizer, optimizer_labels
from train.recipe import RELEASED_STAGES
from train.state import abstract_train_state
from train.step import make_train_step
from wings_jax.model import WingsModel, dummy_batch, init_params
from wings_jax.presets import wings_model

TEXT = flags.DEFINE_string("text", "qwen1_5_7b_chat", "text preset (wings_jax.presets.TEXT_PRESETS)")
SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "sequence length")
REMAT = flags.DEFINE_string("remat", "full", "remat policy")
NO_SCAN = flags.DEFINE_bool("no_scan", False, "unroll the layers instead of scanning them")
BACKEND = flags.DEFINE_string("attention", "auto", "attention backend")


def run(text: str, seq_len: int, remat: str, scan: bool, backend: str) -> dict:
    model = wings_model(text, dtype="bfloat16", param_dtype="float32", remat_policy=remat, scan_layers=scan,
                        attention_backend=backend)
    model = model.replace(wings=dataclasses.replace(model.wings, stage=2)).validate()
    learning_rates = RELEASED_STAGES[2]["learning_rates"]
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(0))
    tx, _ = build_optimizer(shapes, learning_rates, total_steps=1000, warmup_ratio=0.03, weight_decay=0.0)
    step = make_train_step(WingsModel(model), tx, optimizer_labels(shapes, learning_rates))
    start = time.perf_counter()
    state = abstract_train_state(model, tx, jax.random.PRNGKey(0), seq_len)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dummy_batch(model, 1, seq_len))
    abstract_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    return {"benchmark": "compile_time", "text": text, "seq_len": seq_len, "remat_policy": remat, "scan_layers": scan,
            "attention_backend": backend, "parameters": parameters, "abstract_state_s": abstract_s,
            "lower_s": lower_s, "compile_s": compile_s, "total_s": abstract_s + lower_s + compile_s}


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    results = run(TEXT.value, SEQ_LEN.value, REMAT.value, not NO_SCAN.value, BACKEND.value)
    common.print_table("training-step compile time", [
        ("model", f"{results['text']} stage 2, {results['parameters'] / 1e9:.2f} B parameters"),
        ("sequence / remat / scan / attention", f"{results['seq_len']} / {results['remat_policy']} / "
                                                f"{results['scan_layers']} / {results['attention_backend']}"),
        ("abstract state (s)", results["abstract_state_s"]),
        ("trace + lower (s)", results["lower_s"]),
        ("compile (s)", results["compile_s"]),
        ("total (s)", results["total_s"]),
    ])
    common.write_json("compile_time", results)


if __name__ == "__main__":
    app.run(main)

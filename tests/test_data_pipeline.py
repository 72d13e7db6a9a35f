"""The Grain pipeline: static batches, determinism, exact resume, mixing, sharding, bad records."""

import dataclasses
import json
import logging

import grain
import numpy as np
import pytest
from etils import epath
from transformers import AutoTokenizer

from train.data import default_data_config, make_train_iterator
from train.data.demo_data import write_demo_dataset
from train.data.pipeline import mixed_record_dataset
from wings_jax.batch import BATCH_KEYS, validate_batch
from wings_jax.conversation import system_prompt_length
from wings_jax.images import mean_colour_image
from wings_jax.presets import tiny_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_train=96, n_eval=8, seed=0)


@pytest.fixture(scope="module")
def tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.tokenizer_dir)


@pytest.fixture(scope="module")
def model_config(tokenizer):
    config = tiny_model()
    return config.replace(
        text=dataclasses.replace(config.text, vocab_size=512),
        wings=dataclasses.replace(config.wings, system_prompt_length=system_prompt_length(tokenizer)),
    )


def _config(demo, **changes):
    config = default_data_config()
    config.sources = [
        {"path": demo.stage2_train, "kind": "jsonl", "image_root": demo.image_root, "weight": 3.0},
        {"path": demo.text_train, "kind": "jsonl", "weight": 1.0},
    ]
    config.seq_len, config.batch_size = 64, 4
    config.update(changes)
    return config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_static_batches(demo, tokenizer, model_config):
    batches = _take(make_train_iterator(_config(demo), model_config, tokenizer, seed=0, process_index=0,
                                        process_count=1), 4)
    for batch in batches:
        validate_batch(batch, model_config)
        assert batch["input_ids"].shape == (4, 64) and batch["pixel_values"].shape == (4, 1, 28, 28, 3)
        assert (batch["labels"] != -100).any(axis=1).all()
    image_rows = np.concatenate([b["image_valid"][:, 0] for b in batches])
    assert 0 < image_rows.sum() < image_rows.size  # the mix has multimodal and text-only samples


def test_deterministic_and_seeded(demo, tokenizer, model_config):
    def first(seed):
        return _take(make_train_iterator(_config(demo), model_config, tokenizer, seed, 0, 1), 3)

    _assert_same(first(0), first(0))
    assert not np.array_equal(first(0)[0]["input_ids"], first(1)[0]["input_ids"])


def test_exact_resume_through_json_state(demo, tokenizer, model_config):
    config = _config(demo)
    uninterrupted = make_train_iterator(config, model_config, tokenizer, seed=3, process_index=0, process_count=1)
    _take(uninterrupted, 7)  # past one epoch of the text source shard, so the resume crosses a reshuffle
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = _take(uninterrupted, 30)
    restored = make_train_iterator(config, model_config, tokenizer, seed=3, process_index=0, process_count=1)
    restored.set_state(state)
    _assert_same(_take(restored, 30), expected)


def test_grain_checkpoint_handler_round_trip(demo, tokenizer, model_config, tmp_path):
    """The trainer saves the iterator as an Orbax item with Grain's handler."""
    iterator = make_train_iterator(_config(demo), model_config, tokenizer, seed=0, process_index=0, process_count=1)
    _take(iterator, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(iterator))
    expected = _take(iterator, 2)
    restored = make_train_iterator(_config(demo), model_config, tokenizer, seed=0, process_index=0, process_count=1)
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(restored))
    _assert_same(_take(restored, 2), expected)


def test_worker_processes_give_the_same_batches(demo, tokenizer, model_config):
    in_process = _take(make_train_iterator(_config(demo), model_config, tokenizer, 0, 0, 1), 3)
    with_workers = make_train_iterator(_config(demo, worker_count=1), model_config, tokenizer, 0, 0, 1)
    try:
        _assert_same(_take(with_workers, 3), in_process)
    finally:
        with_workers.close()


def test_mixing_follows_weights(demo):
    records = mixed_record_dataset(_config(demo), seed=0)
    picks = np.array([records[i].source_index for i in range(800)])
    assert abs((picks == 0).mean() - 0.75) < 0.03


def test_processes_get_disjoint_shards(demo):
    config = _config(demo)
    config.sources = config.sources[:1]
    shards = []
    for process_index in range(3):
        records = mixed_record_dataset(config, seed=0, process_index=process_index, process_count=3)
        shards.append({records[i].item.record_id for i in range(96 // 3)})  # one epoch of the shard
    assert all(len(shard) == 32 for shard in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert len(shards[0] | shards[1] | shards[2]) == 96


def _bad_records_file(tmp_path, demo):
    good = {"id": "good", "image": "train_00000.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A."}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": "no-conv", "image": "train_00001.png"}),
        json.dumps({"id": "no-gpt", "conversations": [{"from": "human", "value": "Hi"}]}),
        json.dumps({**good, "id": "lost-image", "image": "nowhere.png"}),
        json.dumps({"id": "long", "conversations": [{"from": "human", "value": "red blue " * 40},
                                                     {"from": "gpt", "value": "Yes."}]}),
        "",
        json.dumps(["a list"]),
        json.dumps({**good, "id": "odd-image", "image": 7}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_bad_records_are_counted_and_reported(demo, tokenizer, model_config, tmp_path, caplog, overflow):
    path = _bad_records_file(tmp_path, demo)
    config = _config(demo, overflow=overflow, shuffle=False, num_epochs=1, batch_size=1)
    config.sources = [{"path": path, "kind": "jsonl", "image_root": demo.image_root}]
    iterator = make_train_iterator(config, model_config, tokenizer, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING):
        batches = list(iterator)
    totals = iterator.bad_records.totals()
    assert totals == {
        "malformed_record": 2, "bad_conversations": 1, "no_assistant_turn": 1, "missing_image": 2,
        "truncated": int(overflow == "truncate"), "dropped_too_long": int(overflow == "drop"),
    }
    assert len(batches) == 3 + (overflow == "truncate")  # good, lost-image, (long,) odd-image
    np.testing.assert_array_equal(batches[1]["pixel_values"][0, 0], mean_colour_image(28))
    if overflow == "truncate":
        assert batches[2]["attention_mask"].all()
    for where in (f"{path}:2", f"{path}:3 id=no-conv", f"{path}:4 id=no-gpt", f"{path}:5 id=lost-image",
                  f"{path}:6 id=long", f"{path}:8", f"{path}:9 id=odd-image"):
        assert where in caplog.text
    summary = iterator.bad_records.summary()
    assert "malformed_record: 2" in summary and "missing_image: 2" in summary and "nowhere.png" in summary


def test_bad_record_counts_survive_resume(demo, tokenizer, model_config, tmp_path):
    config = _config(demo, batch_size=1)
    config.sources = [{"path": _bad_records_file(tmp_path, demo), "kind": "jsonl", "image_root": demo.image_root}]
    iterator = make_train_iterator(config, model_config, tokenizer, seed=0, process_index=0, process_count=1)
    _take(iterator, 5)
    restored = make_train_iterator(config, model_config, tokenizer, seed=0, process_index=0, process_count=1)
    restored.set_state(iterator.get_state())
    assert restored.bad_records.totals() == iterator.bad_records.totals()
    assert sum(iterator.bad_records.totals().values()) > 0


def test_finite_epochs_stop(demo, tokenizer, model_config):
    config = _config(demo, num_epochs=2, batch_size=5)
    config.sources = [{"path": demo.text_train, "kind": "jsonl"}]
    batches = list(make_train_iterator(config, model_config, tokenizer, seed=0, process_index=0, process_count=1))
    assert len(batches) == (2 * 96) // 5


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"sources": []}, "data.sources is empty"),
        ({"overflow": "wrap"}, "data.overflow='wrap'"),
        ({"template": "mistral"}, "data.template='mistral'"),
        ({"seq_len": 0}, "data.seq_len=0"),
    ],
)
def test_config_errors(demo, tokenizer, model_config, changes, words):
    with pytest.raises(ValueError, match=words):
        make_train_iterator(_config(demo, **changes), model_config, tokenizer, 0, 0, 1)


def test_model_mismatch_errors(demo, tokenizer, model_config):
    wrong_prompt = model_config.replace(wings=dataclasses.replace(model_config.wings, system_prompt_length=99))
    with pytest.raises(ValueError, match=f"set wings.system_prompt_length={system_prompt_length(tokenizer)}"):
        make_train_iterator(_config(demo), wrong_prompt, tokenizer, 0, 0, 1)
    small_vocab = model_config.replace(text=dataclasses.replace(model_config.text, vocab_size=256))
    with pytest.raises(ValueError, match="text.vocab_size is 256"):
        make_train_iterator(_config(demo), small_vocab, tokenizer, 0, 0, 1)

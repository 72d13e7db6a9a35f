"""Record sources (JSON, JSONL, TFDS array_record) and the generated demo dataset."""

import dataclasses
import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from transformers import AutoTokenizer

from train.data import default_data_config, make_train_iterator
from train.data.demo_data import COLOURS, SPECIAL_TOKENS, write_demo_dataset
from wings_jax.batch import BATCH_KEYS
from wings_jax.conversation import system_prompt_length
from wings_jax.presets import tiny_model
from wings_jax.sources import JsonSource, tfds_example_to_record


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_train=40, n_eval=6, seed=0)


class WingsDataTestTiny(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset of LLaVA records (images as encoded PNG bytes), written without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")
    RECORDS: list = []

    def _info(self):
        features = {
            "id": tfds.features.Text(),
            "conversations": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, (record, image_bytes) in enumerate(self.RECORDS):
            yield index, {"id": record["id"], "conversations": json.dumps(record["conversations"]),
                          "image": np.frombuffer(image_bytes, np.uint8)}


def test_demo_dataset_is_deterministic_and_consistent(demo, tmp_path):
    start = time.perf_counter()
    again = write_demo_dataset(str(tmp_path / "again"), n_train=40, n_eval=6, seed=0)
    assert time.perf_counter() - start < 20
    for field in ("stage1_train", "stage2_train", "text_train", "stage1_eval"):
        with open(getattr(demo, field), "rb") as a, open(getattr(again, field), "rb") as b:
            assert a.read() == b.read(), field
    captions = json.load(open(demo.stage1_train))
    assert len(captions) == 40 and len(json.load(open(demo.stage1_eval))) == 6
    for record in captions[:10]:
        colour, shape = record["conversations"][1]["value"].rstrip(".").split()[1:]
        pixels = np.asarray(Image.open(f"{demo.image_root}/{record['image']}"))
        assert 28 <= pixels.shape[0] <= 48 and 28 <= pixels.shape[1] <= 48
        assert (pixels == COLOURS[colour]).all(axis=-1).sum() > 20, record  # the caption's colour is drawn
        assert shape in ("circle", "square", "triangle")
    qa = [json.loads(line) for line in open(demo.stage2_train)]
    assert {turn["value"] for r in qa for turn in r["conversations"]} >= {"What colour is the shape?"}
    texts = [json.loads(line) for line in open(demo.text_train)]
    for record in texts:
        question, answer = (turn["value"] for turn in record["conversations"])
        a, op, b = question.removeprefix("What is ").rstrip("?").split()
        assert int(answer.rstrip(".")) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
        assert "image" not in record
    eval_ids = {r["id"] for r in json.load(open(demo.stage1_eval))}
    assert not eval_ids & {r["id"] for r in captions}


def test_demo_tokenizer_loads_with_auto_tokenizer(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    assert 300 < len(tokenizer) <= 512
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(token, add_special_tokens=False)) == [token]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "What colour is the shape? A yellow triangle."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_json_source_must_be_a_list(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="records.json: a LLaVA JSON source must hold a list of records, found dict"):
        JsonSource(str(path))


def test_tfds_source_gives_the_same_batches_as_jsonl(demo, tmp_path):
    records = [json.loads(line) for line in open(demo.stage2_train)][:12]
    images = [open(f"{demo.image_root}/{r['image']}", "rb").read() for r in records]
    WingsDataTestTiny.RECORDS = list(zip(records, images, strict=True))
    WingsDataTestTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    tfds_order = [r["id"] for r in map(tfds_example_to_record, tfds.data_source("wings_data_test_tiny", split="train",
                                                                                  data_dir=str(tmp_path)))]
    jsonl = tmp_path / "same_order.jsonl"
    jsonl.write_text("".join(json.dumps(next(r for r in records if r["id"] == i)) + "\n" for i in tfds_order))

    tokenizer = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    model = tiny_model()
    model = model.replace(text=dataclasses.replace(model.text, vocab_size=512),
                          wings=dataclasses.replace(model.wings, system_prompt_length=system_prompt_length(tokenizer)))

    def batches(source):
        config = default_data_config()
        config.update({"sources": [source], "seq_len": 48, "batch_size": 3, "shuffle": False, "num_epochs": 1})
        return list(make_train_iterator(config, model, tokenizer, seed=0, process_index=0, process_count=1))

    from_tfds = batches({"path": "wings_data_test_tiny", "kind": "tfds", "data_dir": str(tmp_path)})
    from_jsonl = batches({"path": str(jsonl), "kind": "jsonl", "image_root": demo.image_root})
    assert len(from_tfds) == len(from_jsonl) == 4
    for a, b in zip(from_tfds, from_jsonl, strict=True):
        assert a["image_valid"].all()
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_tfds_example_mapping_forms():
    turns = {"from": np.array([b"human", b"gpt"]), "value": np.array([b"<image>\nHi", b"Hello."])}
    record = tfds_example_to_record({"id": b"x1", "conversations": turns, "image_path": b"a/b.png"}, "/root")
    assert record == {"id": "x1", "image": "/root/a/b.png",
                      "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]}
    pixels = np.zeros((4, 5, 3), np.uint8)
    record = tfds_example_to_record({"conversations": b'[{"from": "gpt", "value": "ok"}]', "image": pixels})
    assert record["image"] is pixels and "id" not in record
    text_only = tfds_example_to_record({"conversations": "[]", "image": np.zeros((0,), np.uint8), "image_path": b""})
    assert "image" not in text_only
    with pytest.raises(ValueError, match="lacks the 'conversations' feature"):
        tfds_example_to_record({"id": b"x"})

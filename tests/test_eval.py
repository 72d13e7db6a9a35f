"""The inference front ends on a tiny saved checkpoint: wings_jax.api.Assistant, the wings_jax.laws CLI
and train.eval (scoring, interleaved composer, bad inputs counted). The chat CLI: test_chat.py."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from train import eval as eval_cli
from wings_jax import laws as laws_cli
from wings_jax.generate import Sampling


def test_answer_streams_what_it_returns(assistant, checkpoint):
    pieces = []
    image = Image.open(checkpoint / "red.png")
    answer = assistant.answer("What colour?", images=[image], sampling=Sampling(max_new_tokens=5),
                              stream=pieces.append)
    assert "".join(pieces).strip() == answer


def test_option_logprobs_are_the_summed_token_logprobs(assistant):
    """Scoring 'A' vs 'B' must agree with a direct next-token computation from the model logits."""
    turns = [{"from": "human", "value": "pick"}]
    scores = assistant.option_logprobs(turns, ["A", "B"])
    samples = [assistant.sample(turns + [{"from": "gpt", "value": o}], for_answer=False)
               for o in ("A", "B")]
    from wings_jax.model import WingsModel

    for sample, score in zip(samples, scores, strict=True):
        batch = assistant._batch([sample])
        logits = np.asarray(WingsModel(assistant.config).apply({"params": assistant.params}, batch, mode="logits"))
        prompt = assistant.sample(turns).token_ids
        ids = list(sample.token_ids)
        logprobs = jax.nn.log_softmax(logits[0], axis=-1)
        expected = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_eval_cli_scores_and_counts_bad_inputs(checkpoint, tmp_path):
    text = tmp_path / "text.jsonl"
    visual = tmp_path / "visual.jsonl"
    text.write_text("\n".join([
        json.dumps({"id": "t1", "question": "2 + 3 =", "options": ["4", "5"], "answer": "B"}),
        json.dumps({"id": "t2", "question": "1 + 1 =", "options": {"A": "2", "B": "3"}, "answer": 0}),
        "not json",
        json.dumps({"id": "t3", "question": "x", "options": ["a", "b"], "answer": "E"}),
        json.dumps({"id": "t4", "options": ["a", "b"], "answer": "A"}),
    ]) + "\n")
    visual.write_text("\n".join([
        json.dumps({"id": "v1", "question": "colour?", "options": ["red", "blue"], "answer": "A", "image": "red.png"}),
        json.dumps({"id": "v2", "question": "colour?", "options": ["red", "blue"], "answer": "A", "image": "gone.png"}),
    ]) + "\n")
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"bootstrap": 50, "tasks": [
        {"name": "text", "path": str(text)},
        {"name": "visual", "path": str(visual), "image_root": str(checkpoint)},
        {"name": "mixed", "kind": "interleaved", "text_path": str(text), "visual_path": str(visual),
         "image_root": str(checkpoint), "patterns": ["TV", "TTV"], "samples": 3},
    ]}))
    results = eval_cli.main(["--checkpoint", str(checkpoint), "--config", str(config),
                             "--out", str(tmp_path / "out.json")])
    assert results["text"]["scored"] == 2
    assert results["text"]["bad"] == {"malformed_record": 1, "bad_answer": 1, "missing_field": 1}
    assert results["visual"]["scored"] == 1 and results["visual"]["bad"] == {"missing_image": 1}
    low, high = results["text"]["ci95"]
    assert 0 <= low <= results["text"]["accuracy"] <= high <= 1
    mixed = results["mixed"]
    # tiny model: max_images=1, so the one-image patterns are asked; a missing image is counted, not fatal
    assert mixed["TV"]["scored"] + sum(mixed["TV"]["bad"].values()) == 3
    assert json.loads((tmp_path / "out.json").read_text())["text"]["scored"] == 2


def test_bootstrap_interval_brackets_the_mean():
    correct = np.array([1.0] * 30 + [0.0] * 70)
    low, high = eval_cli.bootstrap_interval(correct, 2000, 0)
    assert low < 0.3 < high and high - low < 0.25


def test_laws_cli_writes_json_and_plot(checkpoint, tmp_path):
    data = tmp_path / "laws.jsonl"
    turns = [{"from": "human", "value": "before <image>\nafter the image"}, {"from": "gpt", "value": "red"}]
    data.write_text("\n".join([
        json.dumps({"id": "a", "image": "red.png", "conversations": turns}),
        json.dumps({"id": "b", "image": "missing.png", "conversations": turns}),
        json.dumps({"id": "c", "conversations": "broken"}),
        "[1, 2]",
    ]) + "\n")
    out, plot = tmp_path / "laws.json", tmp_path / "laws.png"
    report = laws_cli.main(["--checkpoint", str(checkpoint), "--data", str(data), "--image-root", str(checkpoint),
                            "--out", str(out), "--plot", str(plot)])
    assert report["samples"] == 2  # the missing image is counted and replaced by the mean colour
    assert report["bad_records"]["missing_image"] == 1
    assert report["bad_records"]["bad_conversations"] == 1 and report["bad_records"]["malformed_record"] == 1
    assert len(report["shares"]["image"]) == 2 and np.isfinite(report["attention_shift"])
    assert json.loads(out.read_text())["samples"] == 2 and plot.read_bytes()[:4] == b"\x89PNG"

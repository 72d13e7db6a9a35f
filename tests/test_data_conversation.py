"""Chat templates: exact prompt strings, exact label masks, the reference's <image> mark rule."""

import pytest
from transformers import AutoTokenizer

from train.data.demo_data import train_demo_tokenizer
from wings_jax.batch import IMAGE_PLACEHOLDER
from wings_jax.conversation import (
    TEMPLATES,
    ConversationError,
    ConversationTokenizer,
    normalise_image_marks,
    render_text,
    system_prompt_length,
)

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "What shape is it?"},
    {"from": "gpt", "value": "A circle."},
]
TEXT_ONLY = [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [render_text(c, t) for c in (CONVERSATION, TEXT_ONLY) for t in TEMPLATES.values()] * 20
    texts += ["What colour is the blue square in the picture? A green triangle. 7 plus 8 minus 4."] * 20
    return AutoTokenizer.from_pretrained(train_demo_tokenizer(texts, str(tmp_path_factory.mktemp("tok"))))


def _labelled_spans(ids, labels):
    """Runs of consecutive labelled positions, as id lists."""
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


def test_qwen_prompt_string(tokenizer):
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA circle.<|im_end|>\n"
    )
    assert render_text(CONVERSATION, TEMPLATES["qwen"]) == expected
    messages = [{"role": "system", "content": "You are a helpful assistant."}] + [
        {"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]} for turn in CONVERSATION
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_llama3_prompt_string():
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5.<|eot_id|>"
    )
    assert render_text(TEXT_ONLY, TEMPLATES["llama3"], "Be brief.") == expected


@pytest.mark.parametrize("template,end", [("qwen", "<|im_end|>\n"), ("llama3", "<|eot_id|>")])
def test_ids_and_labels(tokenizer, template, end):
    encode = ConversationTokenizer(tokenizer, template)
    ids, labels = encode(CONVERSATION, has_image=True)
    assert len(ids) == len(labels)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and labels[ids.index(IMAGE_PLACEHOLDER)] == -100
    cut = ids.index(IMAGE_PLACEHOLDER)
    decoded = tokenizer.decode(ids[:cut]) + "<image>" + tokenizer.decode(ids[cut + 1 :])
    assert decoded == render_text(CONVERSATION, TEMPLATES[template])
    spans = [tokenizer.decode(span) for span in _labelled_spans(ids, labels)]
    assert spans == ["Red." + end, "A circle." + end]


def test_pieces_tokenise_like_the_whole_string(tokenizer):
    ids, _ = ConversationTokenizer(tokenizer, "qwen")(TEXT_ONLY, has_image=False)
    assert ids == tokenizer.encode(render_text(TEXT_ONLY, TEMPLATES["qwen"]), add_special_tokens=False)


def test_system_prompt_length(tokenizer):
    block = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    expected = tokenizer.encode(block, add_special_tokens=False)
    assert system_prompt_length(tokenizer) == len(expected)
    ids, _ = ConversationTokenizer(tokenizer)(TEXT_ONLY, has_image=False)
    assert ids[: len(expected)] == expected
    llama_block = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nHi.<|eot_id|>"
    llama_ids = tokenizer.encode(llama_block, add_special_tokens=False)
    assert system_prompt_length(tokenizer, "llama3", "Hi.") == len(llama_ids)


def _values(turns):
    return [turn["value"] for turn in turns]


def test_image_mark_rules():
    turns = [
        {"from": "human", "value": "Look.<image>\nand <image> again"},
        {"from": "gpt", "value": "I see <image>"},
        {"from": "human", "value": "<image>\nMore?"},
        {"from": "gpt", "value": "No."},
    ]
    assert _values(normalise_image_marks(turns, True)) == ["Look.<image>\nand  again", "I see ", "More?", "No."]
    assert _values(normalise_image_marks(turns, False)) == ["Look.and  again", "I see ", "More?", "No."]
    later = [dict(turns[0], value="Hi"), turns[1], turns[2], turns[3]]
    assert _values(normalise_image_marks(later, True)) == ["Hi", "I see ", "<image>\nMore?", "No."]
    unmarked = [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"}, {"from": "human", "value": "C"},
                {"from": "gpt", "value": "D"}]
    assert _values(normalise_image_marks(unmarked, True)) == ["A", "B", "<image>\nC", "D"]


def test_unmarked_image_record_gets_one_placeholder(tokenizer):
    ids, _ = ConversationTokenizer(tokenizer)(TEXT_ONLY, has_image=True)
    ids_text, _ = ConversationTokenizer(tokenizer)(CONVERSATION, has_image=False)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and ids_text.count(IMAGE_PLACEHOLDER) == 0


@pytest.mark.parametrize(
    "conversations,kind,words",
    [
        (None, "bad_conversations", "non-empty list"),
        ([], "bad_conversations", "non-empty list"),
        ([{"from": "human", "value": 3}], "bad_conversations", "turn 0"),
        ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}], "bad_conversations", "'robot'"),
        ([{"from": "human", "value": "x"}], "no_assistant_turn", "assistant"),
    ],
)
def test_bad_conversations(tokenizer, conversations, kind, words):
    with pytest.raises(ConversationError, match=words) as error:
        ConversationTokenizer(tokenizer)(conversations, has_image=False)
    assert error.value.kind == kind


def test_tokenizer_without_template_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["hello"], trainers.BpeTrainer(special_tokens=["<|endoftext|>"], show_progress=False))
    plain = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match=r"encodes '<\|im_start\|>' as .* 'qwen' chat template needs it"):
        ConversationTokenizer(plain, "qwen")

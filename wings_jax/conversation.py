"""Chat templates (Qwen ChatML, Llama 3) and the tokenisation of LLaVA conversations into ids + labels.

Each template piece is tokenised on its own and the ids are concatenated, so the label mask is exact:
only the assistant turns' text and their end token (plus the newline after it for ChatML) carry
labels; ``<image>`` marks become ``IMAGE_PLACEHOLDER``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from wings_jax.batch import IMAGE_PLACEHOLDER
from wings_jax.config import IGNORE_INDEX

IMAGE_MARK = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(ValueError):
    """A record's conversation cannot be formatted (wrong structure, no assistant turn)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # a BadRecordCounter kind


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as four string patterns; ``{}`` is where the turn's text goes."""

    name: str
    system: str  # the whole system block, from the first token up to the first user turn
    user: str
    assistant_prefix: str  # not labelled
    assistant_suffix: str  # labelled, like the assistant text before it
    special_tokens: tuple[str, ...]  # must each be one token of the tokenizer


TEMPLATES = {
    "qwen": ChatTemplate(
        name="qwen",
        system="<|im_start|>system\n{}<|im_end|>\n",
        user="<|im_start|>user\n{}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    # Llama 3.1's header layout; the system block carries only the given system prompt (no date lines).
    "llama3": ChatTemplate(
        name="llama3",
        system="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def check_conversations(conversations) -> list[dict]:
    """Validate a LLaVA ``conversations`` list; raise ConversationError naming the problem."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError(
            "bad_conversations", f"'conversations' is {conversations!r:.80}, expected a non-empty list"
        )
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError(
                "bad_conversations", f"turn {turn_index} is {turn!r:.80}, expected {{'from', 'value': str}}"
            )
        if turn.get("from") not in HUMAN_ROLES + ASSISTANT_ROLES:
            raise ConversationError(
                "bad_conversations",
                f"turn {turn_index} has from={turn.get('from')!r}, expected one of {HUMAN_ROLES + ASSISTANT_ROLES}",
            )
    if not any(turn["from"] in ASSISTANT_ROLES for turn in conversations):
        raise ConversationError("no_assistant_turn", "no assistant ('gpt') turn to learn from")
    return conversations


def _drop_marks(text: str) -> str:
    """Remove every ``<image>`` mark, with the newline that usually follows it."""
    return text.replace(IMAGE_MARK + "\n", "").replace(IMAGE_MARK, "")


def normalise_image_marks(conversations: Sequence[dict], has_image: bool) -> list[dict]:
    """Apply the reference's mark rule: keep only the first ``<image>`` mark of the first human turn
    that has one and drop all others; an image record without a mark gets ``<image>\\n`` prepended to
    its last human turn. A record without an image keeps no mark."""
    turns = [dict(turn) for turn in conversations]
    kept = False
    for turn in turns:
        text = turn["value"]
        if has_image and not kept and turn["from"] in HUMAN_ROLES and IMAGE_MARK in text:
            head, tail = text.split(IMAGE_MARK, 1)
            turn["value"] = head + IMAGE_MARK + _drop_marks(tail)
            kept = True
        else:
            turn["value"] = _drop_marks(text)
    if has_image and not kept:
        human_turns = [turn for turn in turns if turn["from"] in HUMAN_ROLES]
        if not human_turns:
            raise ConversationError("bad_conversations", "an image record needs a human turn to hold the image")
        human_turns[-1]["value"] = IMAGE_MARK + "\n" + human_turns[-1]["value"]
    return turns


def render_pieces(conversations: Sequence[dict], template: ChatTemplate, system: str) -> list[tuple[str, bool]]:
    """The conversation as (text, labelled) pieces in order; their concatenation is the prompt string."""
    pieces = [(template.system.format(system), False)]
    for turn in conversations:
        if turn["from"] in HUMAN_ROLES:
            pieces.append((template.user.format(turn["value"]), False))
        else:
            pieces.append((template.assistant_prefix, False))
            pieces.append((turn["value"] + template.assistant_suffix, True))
    return pieces


def render_text(conversations: Sequence[dict], template: ChatTemplate, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The full prompt string (``<image>`` marks kept as text)."""
    return "".join(text for text, _ in render_pieces(conversations, template, system))


class ConversationTokenizer:
    """Turns LLaVA conversations into (token ids with IMAGE_PLACEHOLDER, labels).

    ``tokenizer`` is a ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(local_dir)``)
    that has the template's special tokens.
    """

    def __init__(self, tokenizer, template: str = "qwen", system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system_prompt = system_prompt
        for token in self.template.special_tokens:
            ids = self._encode(token)
            if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
                raise ValueError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes {token!r} as {ids}, but the "
                    f"{self.template.name!r} chat template needs it to be a single special token"
                )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    @property
    def system_prompt_length(self) -> int:
        """Tokens of the system block (e.g. ``<|im_start|>system\\n{system}<|im_end|>\\n``): the value
        the model's ``wings.system_prompt_length`` must have."""
        return len(self._encode(self.template.system.format(self.system_prompt)))

    def __call__(self, conversations: Sequence[dict], has_image: bool,
                 normalise_marks: bool = True) -> tuple[list[int], list[int]]:
        """Validated, mark-normalised conversation -> (ids, labels) of equal length.

        ``normalise_marks=False`` keeps every ``<image>`` mark where it is (multi-image prompts at inference).
        """
        turns = check_conversations(conversations)
        if normalise_marks:
            turns = normalise_image_marks(turns, has_image)
        ids: list[int] = []
        labels: list[int] = []
        for text, labelled in render_pieces(turns, self.template, self.system_prompt):
            for part_index, part in enumerate(text.split(IMAGE_MARK)):
                if part_index:
                    ids.append(IMAGE_PLACEHOLDER)
                    labels.append(IGNORE_INDEX)
                part_ids = self._encode(part)
                ids.extend(part_ids)
                labels.extend(part_ids if labelled else [IGNORE_INDEX] * len(part_ids))
        return ids, labels


def system_prompt_length(tokenizer, template: str = "qwen", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> int:
    """Tokens of the template's system block: the value of ``wings.system_prompt_length``."""
    return ConversationTokenizer(tokenizer, template, system_prompt).system_prompt_length

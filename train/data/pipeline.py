"""The Grain training pipeline: sources -> per-process shard -> shuffle -> repeat -> weighted mix ->
record-to-sample (tokenise, load image) -> static batches (``wings_jax.batch.pack_batch``).

``make_train_iterator`` returns a ``TrainIterator``: a checkpointable ``grain.DatasetIterator``
(``get_state`` / ``set_state`` are JSON-serialisable; Orbax saves it with ``grain.checkpoint``)
whose restored copy yields exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from wings_jax.bad_records import BadRecord, BadRecordCounter
from wings_jax.batch import Sample, pack_batch
from wings_jax.config import ModelConfig
from wings_jax.conversation import DEFAULT_SYSTEM_PROMPT, TEMPLATES, ConversationError, ConversationTokenizer
from wings_jax.images import load_image
from wings_jax.sources import SOURCE_KINDS, SourceRecord, make_source

logger = logging.getLogger(__name__)

OVERFLOW_MODES = ("truncate", "drop")


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults; ``sources`` must be filled in."""
    return ml_collections.ConfigDict(
        {
            # each: {path, kind: json|jsonl|tfds, image_root: str|None, weight: float, split, data_dir (tfds)}
            "sources": [],
            "seq_len": 2048,
            "batch_size": 8,  # per process
            "overflow": "truncate",
            "shuffle": True,
            "num_epochs": None,  # None: repeat forever
            "worker_count": 0,  # Grain worker processes; 0 prepares samples in this process
            "read_threads": 2,  # threads per process reading and preparing samples
            "template": "qwen",
            "system_prompt": DEFAULT_SYSTEM_PROMPT,
        }
    )


def validate_data_config(config) -> None:
    """Raise ValueError naming each bad field of the data config."""
    if not config.sources:
        raise ValueError("data.sources is empty; give at least one {path, kind, image_root, weight}")
    for index, spec in enumerate(config.sources):
        if not spec.get("path"):
            raise ValueError(f"data.sources[{index}] has no 'path'")
        if spec.get("kind") not in (None,) + SOURCE_KINDS:
            raise ValueError(f"data.sources[{index}].kind={spec.get('kind')!r} is not one of {SOURCE_KINDS}")
        if not float(spec.get("weight", 1.0)) > 0:
            raise ValueError(f"data.sources[{index}].weight={spec.get('weight')!r} must be > 0")
    for name in ("seq_len", "batch_size"):
        if int(config[name]) < 1:
            raise ValueError(f"data.{name}={config[name]} must be >= 1")
    if config.overflow not in OVERFLOW_MODES:
        raise ValueError(f"data.overflow={config.overflow!r} is not one of {OVERFLOW_MODES}")
    if config.template not in TEMPLATES:
        raise ValueError(f"data.template={config.template!r} is not one of {sorted(TEMPLATES)}")
    if config.num_epochs is not None and int(config.num_epochs) < 1:
        raise ValueError(f"data.num_epochs={config.num_epochs} must be >= 1 or None (forever)")
    if int(config.worker_count) < 0 or int(config.read_threads) < 1:
        raise ValueError(f"data.worker_count={config.worker_count} must be >= 0, read_threads >= 1")


@dataclasses.dataclass(frozen=True)
class TaggedRecord:
    source_index: int
    item: SourceRecord


def _source_seed(seed: int, source_index: int) -> int:
    return int(np.random.SeedSequence([seed, source_index]).generate_state(1)[0])


def _source_dataset(spec, source_index: int, config, seed: int, process_index: int, process_count: int):
    """One source's records for this process: an equal-size strided shard, shuffled, repeated."""
    source = make_source(spec)
    per_process = len(source) // process_count
    if per_process == 0:
        raise ValueError(f"source {spec['path']!r} has {len(source)} records, fewer than {process_count} processes")
    if len(source) % process_count:
        logger.info("%s: %d records left out so that %d processes get equal shards",
                    spec["path"], len(source) % process_count, process_count)
    dataset = grain.MapDataset.source(source)[process_index : per_process * process_count : process_count]
    if config.shuffle:
        dataset = dataset.shuffle(seed=_source_seed(seed, source_index))
    dataset = dataset.repeat(None if config.num_epochs is None else int(config.num_epochs))
    return dataset.map(functools.partial(TaggedRecord, source_index))


def mixed_record_dataset(config, seed: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Records of every source, sharded for this process, shuffled and mixed by weight
    (``TaggedRecord`` items: the source's index in ``config.sources`` and the record)."""
    datasets = [
        _source_dataset(spec, index, config, seed, process_index, process_count)
        for index, spec in enumerate(config.sources)
    ]
    if len(datasets) == 1:
        return datasets[0]
    weights = [float(spec.get("weight", 1.0)) for spec in config.sources]
    return grain.MapDataset.mix(datasets, weights)


class RecordToSample:
    """A source record -> (Sample or None, bad-record reports). Never raises on bad data."""

    def __init__(self, conversations: ConversationTokenizer, model_config: ModelConfig, seq_len: int, overflow: str):
        self.conversations = conversations
        self.image_size = model_config.vision.image_size
        self.image_tokens = model_config.image_tokens
        self.seq_len = seq_len
        self.overflow = overflow

    def __call__(self, tagged: TaggedRecord) -> tuple[Sample | None, tuple[BadRecord, ...]]:
        item = tagged.item
        if item.record is None:
            return None, (BadRecord("malformed_record", item.origin, "?", item.problem or ""),)
        record, record_id = item.record, item.record_id
        image = record.get("image")
        has_image = image is not None and (not hasattr(image, "__len__") or len(image) > 0)
        try:
            ids, labels = self.conversations(record.get("conversations"), has_image)
        except ConversationError as error:
            return None, (BadRecord(error.kind, item.origin, record_id, str(error)),)
        problems = []
        images = []
        if has_image:
            pixels, problem = load_image(image, self.image_size)
            if problem:
                problems.append(BadRecord("missing_image", item.origin, record_id, problem))
            images.append(pixels)
        length = len(ids) + len(images) * (self.image_tokens - 1)
        if length > self.seq_len:
            detail = f"{length} tokens (images expanded) > seq_len {self.seq_len}"
            if self.overflow == "drop":
                return None, (*problems, BadRecord("dropped_too_long", item.origin, record_id, detail))
            problems.append(BadRecord("truncated", item.origin, record_id, detail))
        return Sample(ids, labels, images, source=f"{item.origin} id={record_id}"), tuple(problems)


class _BatchSamples(grain.IterDataset):
    """Groups prepared samples into full static batches; yields (batch or None, bad-record reports).

    A batch is emitted as soon as it is full, so the iterator state between batches is exactly its
    parent's state. At the end of a finite pipeline the incomplete last batch is dropped and
    (None, reports) carries the reports of its records.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, model_config: ModelConfig, seq_len: int):
        super().__init__(parent)
        self.batch_size, self.model_config, self.seq_len = batch_size, model_config, seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _BatchSamplesIterator(self._parent.__iter__(), self)


class _BatchSamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: _BatchSamples):
        super().__init__(parent)
        self._spec = spec

    def __next__(self) -> tuple[dict | None, tuple[BadRecord, ...]]:
        samples: list[Sample] = []
        problems: list[BadRecord] = []
        while len(samples) < self._spec.batch_size:
            try:
                sample, sample_problems = next(self._parent)
            except StopIteration:
                if samples or problems:
                    logger.info("end of data: dropping an incomplete batch of %d samples", len(samples))
                    return None, tuple(problems)
                raise
            problems.extend(sample_problems)
            if sample is not None:
                samples.append(sample)
        return pack_batch(samples, self._spec.model_config, self._spec.seq_len, overflow="truncate"), tuple(problems)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class TrainIterator(grain.DatasetIterator):
    """Yields numpy batch dicts in the ``wings_jax.batch`` format; counts bad records.

    ``bad_records`` is a ``BadRecordCounter`` (``totals()`` per step for metrics, ``summary()`` at
    the end). Its counts are part of the iterator state, so they survive a restore.
    """

    def __init__(self, dataset: grain.IterDataset):
        super().__init__(dataset.__iter__())
        self.bad_records = BadRecordCounter()

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            batch, problems = next(self._parent)
            for problem in problems:
                self.bad_records.add(problem)
            if batch is not None:
                return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "bad_records": self.bad_records.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.bad_records.set_state(state["bad_records"])


def make_train_iterator(
    data_config,
    model_config: ModelConfig,
    tokenizer,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """The training batches of this process (``batch_size`` samples each, ``seq_len`` long).

    ``tokenizer``: a ``transformers`` tokenizer with the template's special tokens.
    ``process_index`` / ``process_count`` default to ``jax.process_index()`` / ``jax.process_count()``.
    Raises ValueError when the config, the tokenizer and the model disagree.
    """
    validate_data_config(data_config)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    conversations = ConversationTokenizer(tokenizer, data_config.template, data_config.system_prompt)
    check_model_matches(model_config, tokenizer, conversations)
    prepare = RecordToSample(conversations, model_config, int(data_config.seq_len), data_config.overflow)
    batch_size = int(data_config.batch_size)
    records = mixed_record_dataset(data_config, seed, process_index, process_count)
    samples = records.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=int(data_config.read_threads), prefetch_buffer_size=2 * batch_size)
    )
    if int(data_config.worker_count) > 0:
        # Workers prepare samples i::worker_count, merged back in order; batching after the merge keeps
        # the batches the same for any worker count.
        _ensure_flags_parsed()
        samples = samples.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_config.worker_count), per_worker_buffer_size=batch_size)
        )
    return TrainIterator(_BatchSamples(samples, batch_size, model_config, int(data_config.seq_len)))


def _ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing has
    parsed them, so take their defaults instead of failing in the workers."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def check_model_matches(model_config: ModelConfig, tokenizer, conversations: ConversationTokenizer) -> None:
    """The tokenizer must fit the model's vocabulary, and the Wings system-prompt length must be the
    template's (the textual learner skips exactly the system block)."""
    if len(tokenizer) > model_config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's text.vocab_size is {model_config.text.vocab_size}"
        )
    expected = conversations.system_prompt_length
    if model_config.wings.enabled and model_config.wings.system_prompt_length != expected:
        raise ValueError(
            f"model wings.system_prompt_length={model_config.wings.system_prompt_length}, but the "
            f"{conversations.template.name!r} system block with system prompt {conversations.system_prompt!r} "
            f"is {expected} tokens with this tokenizer; set wings.system_prompt_length={expected}"
        )

"""The training data pipeline: LLaVA-style records -> static ``wings_jax.batch`` batches.

Main entry point::

    from train.data import default_data_config, make_train_iterator
    from wings_jax.conversation import system_prompt_length

    data = default_data_config()
    data.sources = [
        {"path": "llava_v1_5_mix665k.json", "kind": "json", "image_root": "/data/images", "weight": 1.0},
        {"path": "text_only.jsonl", "kind": "jsonl", "weight": 0.2},
        {"path": "my_tfds_name:1.0.0", "kind": "tfds", "split": "train", "data_dir": "/data/tfds"},
    ]
    data.seq_len, data.batch_size = 2048, 8
    tokenizer = transformers.AutoTokenizer.from_pretrained(local_dir)
    iterator = make_train_iterator(data, model_config, tokenizer, seed=0)   # process index/count from jax
    batch = next(iterator)              # dict of numpy arrays, keys wings_jax.batch.BATCH_KEYS
    state = iterator.get_state()        # JSON-serialisable; iterator.set_state(state) resumes exactly
    iterator.bad_records.totals()       # cumulative {kind: count}: per-step metrics
    iterator.bad_records.summary()      # readable report for the end of the run

The iterator is a ``grain.DatasetIterator``, so Orbax saves it as a checkpoint item with
``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``. Restoring needs the
same data config (worker count included: its state layout differs), seed and process count.

Data config fields (``default_data_config()`` has them all):

- ``sources``: list of ``{path, kind: json|jsonl|tfds, image_root, weight, split, data_dir}``. ``kind``
  defaults from the extension; ``weight`` (default 1) sets the mixing proportion; for ``tfds``,
  ``path`` is the dataset name and the records are mapped by ``sources.tfds_example_to_record``.
- ``seq_len``: tokens per sample, images expanded to ``model_config.image_tokens`` each.
- ``batch_size``: samples per batch of this process.
- ``overflow``: ``truncate`` (cut at seq_len, never inside an image) or ``drop``; both are counted.
- ``shuffle``: seeded shuffle of each source, reshuffled every epoch.
- ``num_epochs``: None repeats forever; N stops after N epochs (the last incomplete batch is dropped).
- ``worker_count``: Grain worker processes preparing samples (0: in this process). Batches are the
  same for every worker count; a saved state restores only into the same worker count.
- ``read_threads``: threads per process reading records and images.
- ``template``: ``qwen`` (ChatML) or ``llama3``; ``system_prompt``: the system message.

Each source is sharded per process (equal strided shards ``process_index::process_count``), shuffled,
repeated, then the sources are mixed by weight. Bad records (``wings_jax.bad_records.BAD_RECORD_KINDS``) never
stop a run: each is logged with its file and record id and counted.

``model_config.wings.system_prompt_length`` must equal ``system_prompt_length(tokenizer, template,
system_prompt)``; ``make_train_iterator`` raises ValueError otherwise, and when the tokenizer has
more tokens than ``text.vocab_size``.

Modules: ``pipeline`` (Grain), ``demo_data`` (the generated demo dataset and tokenizer:
``write_demo_dataset(out_dir, n_train, n_eval, seed)``). The pieces shared with inference live in
``wings_jax``: ``images`` (preprocessing), ``conversation`` (chat templates, ids + labels), ``sources``
(JSON / JSONL / TFDS readers) and ``bad_records`` (counting).
"""

from train.data.demo_data import DemoDataset, train_demo_tokenizer, write_demo_dataset
from train.data.pipeline import TrainIterator, default_data_config, make_train_iterator, validate_data_config

__all__ = [
    "DemoDataset", "TrainIterator", "default_data_config", "make_train_iterator", "train_demo_tokenizer",
    "validate_data_config", "write_demo_dataset",
]

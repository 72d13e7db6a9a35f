"""Counting and reporting records that could not be used as they are.

Bad records never stop a run and are never silently lost: each is logged with its source file and
record id, and counted by kind, so the trainer can log the totals per step and summarise at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

logger = logging.getLogger(__name__)

# kind -> what happens to the record
BAD_RECORD_KINDS = {
    "malformed_record": "skipped (a JSONL line that is not a JSON object, or a record that is not a dict)",
    "bad_conversations": "skipped (no or malformed 'conversations')",
    "no_assistant_turn": "skipped (no assistant turn to learn from)",
    "missing_image": "kept with the mean-colour image (image missing or unreadable)",
    "truncated": "kept, cut to seq_len (overflow='truncate')",
    "dropped_too_long": "skipped (longer than seq_len with overflow='drop')",
}
WARNINGS_PER_KIND = 100  # then further ones are logged at DEBUG, so a bad dataset cannot flood the log
EXAMPLES_PER_KIND = 5  # kept for the summary


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """One problem with one record: ``origin`` is 'file:line' or 'file[index]', ``record_id`` its id."""

    kind: str
    origin: str
    record_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.origin} id={self.record_id}: {self.detail} -> {BAD_RECORD_KINDS[self.kind]}"


class BadRecordCounter:
    """Cumulative counts of bad records by kind, with a few examples of each."""

    def __init__(self):
        self._counts: collections.Counter = collections.Counter()
        self._examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, record: BadRecord) -> None:
        if record.kind not in BAD_RECORD_KINDS:
            raise ValueError(f"unknown bad-record kind {record.kind!r}; expected one of {sorted(BAD_RECORD_KINDS)}")
        self._counts[record.kind] += 1
        count = self._counts[record.kind]
        if count <= WARNINGS_PER_KIND:
            logger.warning("bad record %s", record)
            if count == WARNINGS_PER_KIND:
                logger.warning("%d %s records so far; further ones are logged at DEBUG level", count, record.kind)
        else:
            logger.debug("bad record %s", record)
        if len(self._examples[record.kind]) < EXAMPLES_PER_KIND:
            self._examples[record.kind].append(str(record))

    def totals(self) -> dict[str, int]:
        """Cumulative count per kind (every kind present, zeros included): per-step metrics."""
        return {kind: self._counts[kind] for kind in BAD_RECORD_KINDS}

    def summary(self) -> str:
        """A readable report: counts by kind and a few examples each."""
        if not self._counts:
            return "bad records: none"
        lines = [f"bad records: {sum(self._counts.values())}"]
        for kind in BAD_RECORD_KINDS:
            if self._counts[kind]:
                lines.append(f"  {kind}: {self._counts[kind]} ({BAD_RECORD_KINDS[kind]})")
                lines.extend(f"    e.g. {example}" for example in self._examples[kind])
        return "\n".join(lines)

    def get_state(self) -> dict[str, int]:
        return dict(self._counts)

    def set_state(self, counts: dict[str, int]) -> None:
        unknown = sorted(set(counts) - set(BAD_RECORD_KINDS))
        if unknown:
            raise ValueError(
                f"bad-record state has unknown kinds {unknown}; expected some of {sorted(BAD_RECORD_KINDS)}"
            )
        self._counts = collections.Counter({kind: int(n) for kind, n in counts.items()})

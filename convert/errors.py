"""The one error type of a conversion: the CLI prints it and exits non-zero."""

import logging
from collections.abc import Callable

log = logging.getLogger("convert")


class ConversionError(Exception):
    """A checkpoint or config that cannot be converted; the message names the file, tensor or field."""


def exit_code(work: Callable[[], object]) -> int:
    """Run one conversion for a CLI: 0 when it succeeds, 1 (with the error logged) on a ConversionError."""
    try:
        work()
    except ConversionError as err:
        log.error("%s", err)
        return 1
    return 0

"""The one error type of a conversion: the CLI prints it and exits non-zero."""


class ConversionError(Exception):
    """A checkpoint or config that cannot be converted; the message names the file, tensor or field."""

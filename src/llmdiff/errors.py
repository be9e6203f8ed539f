"""The one exception users see. The CLI prints it as a single line and exits with code 2."""

from __future__ import annotations


class LlmdiffError(Exception):
    """A problem with the user's input (options, paths, dump files), stated in one line."""

    exit_code = 2


class UsageError(LlmdiffError):
    """A bad option value; the message names the option."""


class DumpError(LlmdiffError):
    """A dump that cannot be read; the message names the file."""

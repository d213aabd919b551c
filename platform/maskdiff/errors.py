"""The user errors: problems with what the user asked for or gave, not bugs.

Every tool reports one of these as a single ``error: ...`` line and exit
status 2, never a traceback (see :func:`user_errors`). Library modules raise
them without knowing about the command line.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


class ConfigError(ValueError):
    """A user error in the run configuration; the message names the key."""


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or inconsistent; the message names the file."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects that are not plain training state (refused, never unpickled)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not a bug (reported in one line).

    Besides this module's: the adapters' :class:`InputError` (bad input files, with
    its subclass :class:`ShardError`) and :class:`VocabMismatchError` (data and
    model built with different vocabularies), which live beside their modules.
    """
    from maskdiff.adapters import InputError

    from maskdiff.core.tokens import VocabMismatchError

    return (UserError, InputError, BundleError, ConfigError, VocabMismatchError)


__all__ = ["BundleError", "CheckpointError", "ConfigError", "UnsafeCheckpointError", "UserError", "user_errors"]

"""Errors that a retry cannot fix.

A worker group restarts from its last checkpoint after any exception (run.max_failures), and an
in-process run retries the same way. That is right for a lost worker or node, and wrong for an
error that the same input will raise again: it only spends the retries, the time and the
terminal. Those are raised as `NotRetryable`; the in-process retry loop and the worker group's
failure policy (run/failures.py) end the run on them at once, and the CLI prints their message,
one paragraph naming what to change, with the traceback in the run's log file.
"""
from __future__ import annotations


class NotRetryable(Exception):
    """An error the same run would raise again: end the run, spend no retry."""


class NonFiniteError(NotRetryable):
    """A loss, gradient or weight became NaN or infinite. Nothing is saved from that state."""


class LabelError(NotRetryable):
    """A label outside [0, num_classes) in a batch (datasets whose labels are not read up front)."""


class UserCodeError(NotRetryable):
    """The user's model or dataset builder raised inside the loop (a shape error, say)."""


class StorageError(NotRetryable):
    """A write to the run directory failed for a reason a retry cannot change (no space left,
    a read-only filesystem, a quota): the message names the path, the reason and the free space."""


class RunLocked(NotRetryable):
    """Another live process holds the run directory."""

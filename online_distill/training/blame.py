"""Which errors on a worker a retry can fix, decided on the worker where the error happens.

A worker group restarts from its last checkpoint after any error of a worker (run.max_failures).
That is what a lost worker or node needs, and wrong for an error the same input raises again:
the user's dataset builder, model builder or forward, the loss on the logits the model returned.
Those are raised here as UserCodeError (a NotRetryable): the controller's failure policy ends the
run at once (run/failures.py), and the driver prints the message, one paragraph naming what
failed, where (rank, host, peer, epoch, step) and what to change.

An error of a collective (torch.distributed: another rank was lost while this one waited for it)
is left as it is, even inside the user's forward (DDP broadcasts buffers there) or backward
(DDP all-reduces gradients): it is what a lost worker looks like from the ranks that are left,
and a retry is what fixes it. So are the interpreter's own ends (KeyboardInterrupt, SystemExit)
and running out of memory, which another attempt may not repeat.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

from ..config.schema import ConfigError
from ..errors import NotRetryable, UserCodeError

LOST_PEER_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe",
                   "processgroup", "process group", "timed out", "socket timeout")
"""Words of the errors a collective raises when another rank is gone (torch raises some of them
as a plain RuntimeError, with the backend's message)."""


def retry_may_fix(e: BaseException) -> bool:
    """Whether `e`, raised inside the user's code on a worker, may not repeat on another attempt:
    a collective's error (another rank was lost), Ray's own, the interpreter ending, or memory
    running out."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)) or lost_peer(e):
        return True
    # Ray's own errors (an actor or node lost) are Ray's to retry
    return any(cls.__module__.startswith("ray.") or cls.__name__ == "OutOfMemoryError" for cls in type(e).__mro__)


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is what a collective raises on a rank whose peer rank is gone."""
    if any(cls.__module__.startswith("torch.distributed") or cls.__name__ == "DistError" for cls in type(e).__mro__):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in LOST_PEER_WORDS)


def first_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


Said = str | Callable[[], str]
"""A part of the message, or what makes it: made only when the user's code raised (a training
step's forward, loss and backward each pass through here; their words cost nothing then)."""


@contextlib.contextmanager
def user_code(what: Said, where: Said, allowed: Said) -> Iterator[None]:
    """Around a call into the user's code on a worker: an error a retry cannot fix becomes a
    UserCodeError naming `what` failed, `where`, and what is `allowed`; the rest pass as they are."""
    try:
        yield
    except NotRetryable:
        raise
    except BaseException as e:
        if retry_may_fix(e):
            raise
        what, where, allowed = (s() if callable(s) else s for s in (what, where, allowed))
        said = str(e) if isinstance(e, ConfigError) else f"{what} raised {type(e).__name__}: {first_line(e)}"
        raise UserCodeError(f"{said} ({where}). Nothing was retried: the same input raises it again, whatever "
                            f"run.max_failures says. Allowed: {allowed}") from e


def on_rank(rank: int) -> str:
    return f"on rank {rank}, host {socket.gethostname()}"

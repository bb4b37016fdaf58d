"""Exceptions that the CLI turns into a one-line message and a distinct exit status."""


class FastError(Exception):
    """Base: the message is one line that names the thing and what happened to it."""

    exit_status = 1


class UserError(FastError):
    """A mistake in what the user asked for or pointed at: bad flag, bad file, missing data."""

    exit_status = 2


class BudgetTooShort(UserError):
    """The budget cannot hold even the final evaluation at the speed measured at start."""


class Interrupted(FastError):
    """SIGINT/SIGTERM stopped a run after it saved a checkpoint; the message says how to resume."""

    exit_status = 3


class Diverged(FastError):
    """The loss became NaN or inf; the last checkpoint on disk is from before it."""

    exit_status = 4


class LostRank(FastError):
    """Under torchrun, another rank stopped answering (crashed, hung, stopped, unreachable).

    Exit status 1: a failure that ``torchrun --max-restarts`` restarts from the checkpoint."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text (or its type name), for a one-line message."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]

"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """A mistake in what the user asked for or pointed at: bad flag, bad file, missing data.

    The message must name the thing and what is wrong with it, in one line; the CLI prints it
    without a traceback.
    """

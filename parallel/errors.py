"""The single error type for user mistakes.

It lives here, at the bottom of the import graph next to the device set-up, so that data/, optim/, parallel/
and train/ can all raise it; the CLI prints it as one line and exits 2. Anything else is a bug.
"""


class UserError(Exception):
    """A mistake in the user's input (config, command line, files); the message names the problem and the fix."""

"""The one error type that reaches users: a single line naming the bad key, file or flag, and exit code 2."""


class UserError(Exception):
    """Bad input from the user (recipe, path, flag, model file). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2

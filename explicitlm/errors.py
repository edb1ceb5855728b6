"""Expected mistakes: a user can act on them, so programs print one line and exit 2."""


class UserError(Exception):
    """An expected mistake by the user (a missing file, a wrong key, a mismatched bank): the
    programs print the message as one line and exit 2; a traceback only with --debug."""

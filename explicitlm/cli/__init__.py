"""The installed commands (`[project.scripts]`): explicitlm-sft, -convert, -evaluate, -serve, -ask.

Each program's module has `run(argv)`, which does the work and raises, and `main(argv)`, the
command: an expected mistake (`UserError`, config errors included) prints one line and exits 2; a
traceback only for a bug, or with --debug. `ray_jobs/*.py` call the same `main`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from explicitlm.errors import UserError


def user_error(error: BaseException) -> UserError | None:
    """The UserError behind an exception, also one raised in a Ray Train worker or task."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a Ray task error carries the original exception
        if isinstance(e, UserError):
            return cause if isinstance(cause, UserError) else e
        todo += [e.__cause__, e.__context__, cause, getattr(e, "controller_failure", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None


def command(name: str, body: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run a program's body with `--debug` taken out of argv; returns the exit code (the body's, when
    it returns an int; else 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = body(argv)
        return code if isinstance(code, int) else 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        found = user_error(e)
        if found is None or debug:
            raise
        message = " ".join(str(found).split())  # one line, whatever the message's own layout
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2

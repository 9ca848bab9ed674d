"""How every llgbm command line reports a failure: one line, or the traceback with ``--debug``.

``run_command(lambda: handler(args), debug=args.debug)`` returns the handler's exit code, or
prints ``error: <first line>`` and returns 2 for bad input (our errors subclass ValueError) and
OS errors (an unwritable or full disk), or prints ``interrupted`` and returns 130 on Ctrl-C.
Torch-free, so a CLI's light commands stay light.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "error_line", "run_command"]

EXIT_ERROR = 2  # bad input or a failure the message explains
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


def error_line(e: BaseException) -> str:
    """The one line a user reads: the message's first line, an OSError as ``path: reason``."""
    if isinstance(e, OSError) and e.strerror:  # "[Errno 13] ..." -> "runs/x: Permission denied"
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_command(
    func: Callable[[], int | None],
    *,
    debug: bool = False,
    interrupted: str = "interrupted",
    catch_all: bool = False,
) -> int:
    """Run ``func`` and turn its failure into one line on stderr and an exit code.

    ``catch_all``: also summarise unexpected exceptions (named by their type), for commands whose
    users never want a traceback by default; otherwise only ValueError and OSError are ours to
    explain and anything else is a bug that keeps its traceback.
    """
    caught = (Exception,) if catch_all else (ValueError, OSError)
    try:
        code = func()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except caught as e:
        if debug:
            raise
        msg = error_line(e)
        if not isinstance(e, ValueError | OSError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    return 0 if code is None else int(code)

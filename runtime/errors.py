"""One error base for the whole project, and the command-line wrapper that prints it in one line.

Every refusal and every stopped job raises a `ToolkitError` (each stage has its own subclass:
HarvestError, TrainError, EvalError, ...). Every CLI runs its work inside `one_line_errors(app)`,
so any of them, raised by the stage's own code or by shared code, ends as

    <app>: error: <message>        (on stderr, exit code 2)

and never as a traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from runtime.files import disk_full_behind

# OSErrors that say a path cannot be used as given (a folder where a file should be, no permission, a
# read-only disk, ...): with the path named, one line the user can act on, not a traceback
PATH_ERRORS = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS, errno.ENOENT,
               errno.ENAMETOOLONG, errno.EINVAL, errno.EFBIG, errno.ELOOP)


class ToolkitError(Exception):
    """Bad input, a refused operation or a stopped job: a message the user can act on, one line."""


@contextmanager
def one_line_errors(app: str) -> Iterator[None]:
    """Run the body; a ToolkitError (or a Hydra composition error, a full disk that the stage did not
    report itself, however the library underneath raised it, or a path that cannot be used, named by
    the OSError) becomes one line and exit code 2."""
    from hydra.errors import HydraException

    try:
        yield
    except ToolkitError as e:
        fail(app, str(e))
    except HydraException as e:  # before OSError: Hydra's missing-config error is one
        fail(app, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except Exception as e:
        full = disk_full_behind(e)
        if full is not None:
            fail(app, f"no space left on device writing {full.filename or 'a file'}; what was saved before is "
                      "intact (temporaries removed): free space and rerun the same command")
        if isinstance(e, OSError) and e.filename and e.errno in PATH_ERRORS:
            fail(app, f"cannot use {e.filename}: {e.strerror}")
        raise


def fail(app: str, message: str) -> None:
    """Print `<app>: error: <message>` on stderr and exit with code 2."""
    print(f"{app}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def reraise_as(error: type[ToolkitError]) -> Iterator[None]:
    """Run the body; any other ToolkitError (one raised by shared code) is raised again as `error`,
    with the same message, so that an app's callers see the app's own error class."""
    try:
        yield
    except error:
        raise
    except ToolkitError as e:
        raise error(str(e)) from None

"""The exit codes of `pneumoscan run`, and the one rule that picks a run's code: every
other place (the command line's help, the run log, RunSummary) takes them from here."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence

from pneumoscan.records import FileResult

EXIT_OK = 0  # every file classified, or skipped for a stated reason
EXIT_FATAL = 1  # the run could not be done (bad model, unwritable output, ...)
EXIT_USAGE = 2  # bad command line
EXIT_UNREADABLE = 3  # the run completed, but some files could not be read (status error),
# or some studies' DICOM outputs could not be sent (RunSummary.push_failures)
EXIT_LOCKED = 4  # another run holds the state file: this run did nothing

# What each code means, as the command line's help shows it (docs/CRON.md says what cron
# should do about each).
EXIT_CODES = {
    EXIT_OK: "every file classified, or skipped for a stated reason",
    EXIT_FATAL: "fatal error: the run could not be done (bad model, unusable state file, "
                "unwritable output)",
    EXIT_USAGE: "usage error (bad command line)",
    EXIT_UNREADABLE: "the run completed, but some files could not be read (listed with "
                     "reasons), or some studies' DICOM outputs could not be sent (--push; "
                     "the next run sends them) or are of a kind the destination does not "
                     "accept",
    EXIT_LOCKED: "another run holds the state file: this run did nothing (see --wait)",
}
INTERRUPTED_CODES = "interrupted by SIGINT (Ctrl-C) or SIGTERM: what was computed is kept"


def exit_code(results: Iterable[FileResult], push_failures: Sequence[str] = ()) -> int:
    """The exit code of a run that completed: EXIT_UNREADABLE when a file could not be
    read or a study's DICOM outputs could not be sent, else EXIT_OK."""
    if push_failures or any(r.status == "error" for r in results):
        return EXIT_UNREADABLE
    return EXIT_OK


def exit_codes_help() -> str:
    """The table of exit codes, one a line, for --help and the module docs."""
    interrupted = 128 + signal.SIGINT.value, 128 + signal.SIGTERM.value
    lines = [f"{code}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines + [f"{interrupted[0]}, {interrupted[1]}  {INTERRUPTED_CODES}"])


class RunError(Exception):
    """A run that cannot be done or go on (the message says why); `exit_code` is what the
    command line exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """The run was stopped by a signal (the command line raises it on SIGINT and SIGTERM).
    A BaseException, like KeyboardInterrupt, so that no handler of errors takes it for
    one; what was computed is kept in the state. Exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum)
        super().__init__(f"interrupted by {self.signal.name}")
        self.exit_code = 128 + self.signal.value

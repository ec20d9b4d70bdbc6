"""How a script ends: fail() for an error a person can act on, run() around a script's main for the rest
(Ctrl-C, a reader that closes the pipe, an unexpected error), and stdout in UTF-8 whatever the locale.
Importing this module also makes Ctrl-C before main (while the scripts import torch, which takes seconds)
end with the same one line as Ctrl-C during main: the scripts import it first.

An error is one line on stderr, in our words: what is wrong and what to do. A library's message is never
passed on whole (it may advise switching a protection off, or name an internal the user never called):
an unexpected error shows its type and the first sentence of its message, cut short.
"""

import errno
import os
import sys

from support.torchrun import processes

ERROR_DETAIL_CHARS = 120  # a library's message quoted in ours is cut at a word boundary before this
INTERRUPTED = "\ninterrupted"  # what Ctrl-C prints, on stderr


def fail(message):
    raise SystemExit(f"error: {message}")


def run(main):
    """Run a script's main: Ctrl-C stops cleanly (status 130), a reader that closes the pipe (| head) ends
    generation quietly, and an unexpected error is one line. Under torchrun only rank 0 prints what a run
    prints, but every rank prints the error it finds itself, marked with its rank after rank 0: torchrun
    stops the other ranks as soon as one exits, so rank 0 may never get to print it."""
    world_size, rank = processes()
    write_utf8()
    if rank != 0:  # every process computes the same tokens: one prints them
        sys.stdout = sys.stderr = open(os.devnull, "w")
    elif world_size > 1:
        sys.stdout = OutputToClosedPipe(sys.stdout)
    try:
        main()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:  # fail(): one line, which another rank marks with its number
        if rank != 0 and isinstance(stop.code, str):
            exit_with(f"[rank {rank}] {stop.code}")
        raise
    except Exception as error:
        if isinstance(error, OSError) and closed_pipe(error):  # stdout's reader is gone: stop, as `yes | head` does
            write_nowhere()
            sys.exit(0)
        if os.environ.get("DEBUG") == "1":
            raise
        rank_mark = f"[rank {rank}] " if rank else ""
        exit_with(f"{rank_mark}error: {summary(error)} (set DEBUG=1 to see where)")


def exit_with(message):
    """One line on the real stderr (another rank's sys.stderr writes nowhere), exit status 1."""
    print(message, file=sys.__stderr__, flush=True)
    sys.exit(1)


def summary(error):
    """An exception we did not foresee, as its type and the first sentence of its message, cut short: what
    failed, without the advice a library may add after it."""
    sentence = shorten(str(error)).split(". ")[0]
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def shorten(text, limit=ERROR_DETAIL_CHARS):
    """The first line of `text`, cut at a word boundary so that it fits `limit` characters."""
    line = (text.splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    return line[: limit - 3].rsplit(" ", 1)[0] + "..."


def closed_pipe(error):
    """Whether a write failed because the reader closed the pipe (Windows reports EINVAL for it)."""
    return isinstance(error, BrokenPipeError) or (sys.platform == "win32" and error.errno == errno.EINVAL)


def write_nowhere():
    """Point stdout's file descriptor at the null device, so that Python's final flush does not fail too."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())


class OutputToClosedPipe:
    """Rank 0's stdout under torchrun: when the reader closes the pipe, generation goes on without output,
    because the other processes wait for rank 0 in every layer's collectives."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as error:
            if not closed_pipe(error):
                raise
            write_nowhere()
            self.stream = open(os.devnull, "w", encoding="utf-8")
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as error:
            if not closed_pipe(error):
                raise

    def __getattr__(self, name):
        return getattr(self.stream, name)


def write_utf8():
    """Generated text goes out as UTF-8 whatever the locale: Windows encodes redirected output in its code
    page, where Chinese text or an emoji would raise UnicodeEncodeError. (stderr replaces what it cannot encode.)"""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    if encoding.lower().replace("-", "") != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")


def interrupted_quietly(kind, error, traceback, python_hook=sys.excepthook):
    """sys.excepthook: Ctrl-C that no code caught (during the scripts' imports) prints one line, not a
    traceback; Python then ends as interrupted (status 130 in a shell). Other errors as Python prints them."""
    if issubclass(kind, KeyboardInterrupt):
        print(INTERRUPTED, file=sys.stderr, flush=True)
    else:
        python_hook(kind, error, traceback)


sys.excepthook = interrupted_quietly

"""The scripts' settings: each UPPERCASE global can be overridden by an environment variable of the same
name, and every setting is checked against its range or its choices before any work; the prompt, from
INPUT_STRING or INPUT_FILE; and stdin, where a chat's messages come from.
"""

import math
import os
import sys
from pathlib import Path

import speedups
from support.checkpoint import LLAMA_3_VOCAB_SIZE, context_length, file_problem
from support.exits import fail

# The numeric settings of both scripts and their ranges (lowest, highest; None: unbounded), and the
# settings that take one of a few values. A script checks the ones it has.
RANGES = {"MAX_NEW_TOKENS": (1, None), "PREFILL_CHUNK": (1, None), "BEAM_WIDTH": (1, None),
          "TEMPERATURE": (0.0, None), "LENGTH_PENALTY": (None, None),
          "SHOWN_ALTERNATIVES": (0, LLAMA_3_VOCAB_SIZE - 1), "SEED": (0, 2**64 - 1),  # torch's seeds: 64 bits
          "DRAFT_TOKENS": (1, None)}
CHOICES = {"QUANTIZE": tuple(speedups.FORMATS), "SPEEDUPS": (0, 1), "SHOW_TOKENS": (0, 1), "CHAT": (0, 1),
           "LOOK_INSIDE": (0, 1), "DRAFT_MEASURE": (0, 1)}


def apply_settings(settings):
    """Override each UPPERCASE str/int/float global of a script by the environment variable of that name,
    then check every setting the script has against RANGES and CHOICES."""
    for name, default in list(settings.items()):
        text = os.environ.get(name)
        if not name.isupper() or text is None or type(default) not in (str, int, float):
            continue
        try:
            settings[name] = type(default)(text)
        except ValueError:
            fail(f"{name}={text!r} is not a valid {type(default).__name__} (the default is {default!r})")
    for name, (low, high) in RANGES.items():
        if name in settings:
            check_range(name, settings[name], low, high)
    for name, choices in CHOICES.items():
        if name in settings and settings[name] not in choices:
            fail(f"{name}={settings[name]!r} is not supported; choose one of: {', '.join(map(repr, choices))}")
    if "KERNELS" in settings:
        try:
            speedups.kernel_choice(settings["KERNELS"])
        except ValueError as error:
            fail(f"KERNELS={settings['KERNELS']!r}: {error}")
    if settings.get("QUANTIZE") and not settings.get("SPEEDUPS", 1):
        fail(f"QUANTIZE={settings['QUANTIZE']!r} needs SPEEDUPS=1: 8- and 4-bit weights live in speedups/")


def check_range(name, value, low=None, high=None):
    """A numeric setting must be a finite number in [low, high] (None: no bound)."""
    too_low = low is not None and value < low
    too_high = high is not None and value > high
    if math.isfinite(value) and not too_low and not too_high:
        return
    bounds = []
    if low is not None:
        bounds.append(f"at least {low}")
    if high is not None:
        bounds.append(f"at most {high}")
    fail(f"{name}={value} is out of range: it must be {' and '.join(bounds) or 'a finite number'}")


def read_prompt(input_string, input_file, tokenizer, params):
    """The prompt: INPUT_FILE's text when it is set, else INPUT_STRING. The file must be a regular file (a
    named pipe would wait forever, /dev/zero would never end) and no larger than the most text the model's
    context can hold, checked before it is read: every token stands for at most as many bytes as the
    tokenizer's longest token, so a larger file has more tokens than the context holds."""
    if not input_file:
        return input_string
    path = Path(input_file).expanduser()
    problem = file_problem(path)
    if problem:
        fail(f"INPUT_FILE={input_file!r} {problem}; give a UTF-8 text file, or unset INPUT_FILE")
    longest_token = max(len(piece) for piece in tokenizer.model.token_byte_values())  # bytes
    limit = context_length(params) * longest_token
    size = path.stat().st_size
    if size > limit:
        fail(f"INPUT_FILE={input_file!r} is {size} bytes, more text than the model's context of "
             f"{context_length(params)} tokens can hold (at most {limit} bytes, {longest_token} per token); give a "
             "shorter file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror or type(error).__name__
        fail(f"INPUT_FILE={input_file!r} cannot be read ({reason}); give a UTF-8 text file, or unset INPUT_FILE")


def check_chat_input():
    """CHAT=1 reads the user's messages from stdin, which must be open for reading: checked before the model
    loads, rather than failing at the first message."""
    problem = stdin_problem()
    if problem:
        fail(f"CHAT=1 reads your messages from stdin, which {problem}: run it in a terminal, or pipe the messages "
             "in, one per line")


def stdin_problem():
    """Why stdin cannot give lines, in words, or None: closed (`<&-`), or open for writing only (`0>file`).
    (Python itself refuses to start with a folder as stdin.)"""
    try:
        descriptor = sys.stdin.fileno()
        os.fstat(descriptor)
    except (AttributeError, OSError, ValueError):  # None (closed at start), or its descriptor is gone
        return "is closed"
    if sys.platform != "win32":
        import fcntl  # Unix only: how the descriptor was opened

        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            return "is open for writing only"
    return None

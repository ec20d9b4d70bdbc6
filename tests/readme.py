"""README.md's commands, as a newcomer copies them: its code blocks, by the heading they sit under, and the
commands in them and in its inline code. Standard library only: .ci/run uses it before any install,

    python3 tests/readme.py setup      # prints README's set-up block, which .ci/run then runs as printed
    python3 tests/readme.py tests      # README's test block, likewise

and tests/test_readme.py runs the stand-in's run command and checks that every other command exists.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SETUP_HEADING = "Set up, and try it before you have Meta's weights"
TESTS_HEADING = "Tests"
# name on the command line: (heading, which bash block under it, counting from 0)
BLOCKS = {"setup": (SETUP_HEADING, 0), "run": (SETUP_HEADING, 1), "tests": (TESTS_HEADING, 0)}
FENCE = "```"
PROMPT = "$ "  # a console transcript's command line
# Inline code that is a command to copy: settings, then one of the programs a newcomer runs.
INLINE_COMMAND = re.compile(r"`((?:[A-Z_]+=\S* )*(?:python3?|pip|hf|llama-model|torchrun|bash) [^`]+)`")


def code_blocks(text):
    """[(heading, language, code)] of every fenced code block, in order, under the nearest heading above."""
    blocks, heading, language, lines = [], "", None, []
    for line in text.splitlines():
        if language is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif language is None and line.startswith(FENCE):
            language, lines = line[len(FENCE):].strip(), []
        elif language is not None and line.startswith(FENCE):
            blocks.append((heading, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def block(name, text=None):
    """The code of one of BLOCKS (a bash block)."""
    heading, index = BLOCKS[name]
    found = [code for under, language, code in code_blocks(text or README.read_text()) if under == heading
             and language == "bash"]
    if len(found) <= index:
        raise SystemExit(f"README.md has no bash block {index + 1} under the heading {heading!r}")
    return found[index]


def commands(text=None):
    """Every command README shows: the lines of its bash blocks (a trailing backslash joins a line to the
    next), the $-lines of its console transcripts, and its inline code that runs a program."""
    text = text or README.read_text()
    found = []
    for _, language, code in code_blocks(text):
        if language == "bash":
            found += [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]
        elif language == "console":
            found += [line[len(PROMPT):] for line in code.splitlines() if line.startswith(PROMPT)]
    prose = re.sub(rf"{FENCE}.*?{FENCE}", "", text, flags=re.DOTALL)
    return found + INLINE_COMMAND.findall(prose)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in BLOCKS:
        raise SystemExit(f"usage: python3 tests/readme.py {'|'.join(BLOCKS)}")
    print(block(sys.argv[1]))

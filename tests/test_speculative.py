"""run_inference.py's speculative decoding (DRAFT, DRAFT_TOKENS): greedy with any proposer is plain greedy, token for
token, in float32 (random and real weights) and up to a measured near tie in bfloat16; sampling with drafts draws from
the model's own distribution (a chi-square test on the dice model); a draft model's cache catches up exactly and is
kept across chat turns; the report and the per-token lines; bad drafts are one line before anything loads."""

import io
import json
import re
import shutil

import pytest
import torch
from llama_models.llama3.tokenizer import Tokenizer

import run_inference
from conftest import DICE_LOGITS, greedy_without_cache, load, reference_model, run_script, shown_token_ids
from standin.random_checkpoint import TINY, fixed_distribution_weights, write_checkpoint
from test_bad_input import fails_with
from test_chat import MESSAGES, REPLY_TOKENS, SYSTEM, chat, expected_chat, fed_per_turn, stopping_dir  # noqa: F401
from test_model_parallel import torchrun

ONE_WORKER_FIXTURES = ["bfloat16_runs"]  # its tests on one xdist worker (conftest): computed once (14 s)

PROMPTS = ["The capital of France is", "Once upon a time, once upon a time, there was a", "1, 2, 3, 4, 5, 6, 7,"]
NEW_TOKENS = 40
DRAFT_NOISE = 0.05  # Tiny-Draft: the tiny weights plus this share of their spread as noise: it agrees with Tiny often
PROPOSERS = ["lookup", "self-int4", "Tiny-Draft", "Tiny-Instruct"]  # Tiny-Instruct: the same weights, another name


@pytest.fixture(scope="module")
def drafts_dir(tmp_path_factory, tiny_weights):
    """A LLAMA_MODELS_DIR with the tiny model as "Tiny" and "Tiny-Instruct", and "Tiny-Draft", a noisy copy of it."""
    folder = tmp_path_factory.mktemp("drafts")
    write_checkpoint(folder / "Tiny", TINY, tiny_weights)
    write_checkpoint(folder / "Tiny-Instruct", TINY, tiny_weights)
    generator = torch.Generator().manual_seed(3)
    noisy = {name: (w.float() + DRAFT_NOISE * w.float().std() * torch.randn(w.shape, generator=generator)).to(w.dtype)
             for name, w in tiny_weights.items()}
    write_checkpoint(folder / "Tiny-Draft", TINY, noisy)
    return folder


MAX_SEQ_LEN = 256  # of every model loaded here: each run writes the KV cache from position 0, so runs share models


@pytest.fixture(scope="module")
def loaded(distributed):
    """The script's load_model, once per checkpoint folder and options for the whole module."""
    models = {}

    def get(folder, dtype=torch.float32, quantize="", use_speedups=True):
        key = (folder, dtype, quantize, use_speedups)
        if key not in models:
            models[key] = load(run_inference, folder, MAX_SEQ_LEN, dtype, quantize=quantize, use_speedups=use_speedups)
        return models[key]

    return get


def proposer(kind, loaded, folder, model_name, draft_tokens, sampling=None, **options):
    """The proposer the script builds for DRAFT=kind, in-process, with a fresh cache account (a draft model as the
    script loads it: self-int4 is the model's own folder in int4)."""
    if kind == "lookup":
        return run_inference.PromptLookup(draft_tokens, sampling)
    if kind == "self-int4":  # 4-bit weights compute in bfloat16 (run_inference.draft_format)
        options = {**options, "dtype": torch.bfloat16}
        return run_inference.DraftModel(loaded(folder / model_name, quantize="int4", **options), draft_tokens, sampling)
    return run_inference.DraftModel(loaded(folder / kind, **options), draft_tokens, sampling)


def speculative(model, proposer, prompt_ids, new_tokens, stop_tokens, **options):
    return list(run_inference.speculative_generate(model, proposer, prompt_ids, new_tokens, stop_tokens, **options))


@pytest.fixture(scope="module")
def plain_greedy():
    """Plain greedy decoding's NEW_TOKENS token ids, and the logits each was chosen from (tokens, vocab), once per
    model and prompt."""
    runs = {}

    def get(model, prompt_ids, stop_tokens):
        key = (id(model), tuple(prompt_ids))
        if key not in runs:
            steps = []
            on_token = lambda step, token_id, logits: steps.append(logits.float())
            ids = list(run_inference.generate(model, prompt_ids, NEW_TOKENS, stop_tokens, on_token=on_token))
            runs[key] = ids, torch.stack(steps[: len(ids)])
        return runs[key]

    return get


# ---------------------------------------------------------------------------------------------------------
# Greedy: exactly plain greedy.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
@pytest.mark.parametrize("kind", PROPOSERS)
def test_greedy_with_any_proposer_is_plain_greedy(kind, use_speedups, drafts_dir, tokenizer, loaded, plain_greedy):
    """Random weights, float32, three prompts, k = 1 and 4: the same tokens as plain greedy decoding; over the
    prompts some drafts are accepted and some rejected, so both paths run."""
    if kind == "self-int4" and not use_speedups:
        pytest.skip("4-bit weights live in speedups")
    model = loaded(drafts_dir / "Tiny", use_speedups=use_speedups)
    tally = {"accepted": 0, "rejected": 0}
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        plain, _ = plain_greedy(model, prompt_ids, tokenizer.stop_tokens)
        for k in (1, 4):
            draft = proposer(kind, loaded, drafts_dir, "Tiny", k, use_speedups=use_speedups)
            assert speculative(model, draft, prompt_ids, NEW_TOKENS, tokenizer.stop_tokens) == plain
            tally["accepted"] += draft.tally["accepted"]
            tally["rejected"] += draft.tally["drafted"] - draft.tally["accepted"]
    assert tally["accepted"] > 0
    assert tally["rejected"] > 0 or kind == "Tiny-Instruct"  # the same weights agree everywhere


SMOLLM_PROMPTS = ["The capital of France is",
                  "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n",
                  "Summarise: The river flooded the old town in spring. The old town was rebuilt on the hill. "
                  "Summary: The river"]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir):
    return Tokenizer(smollm_dir / "SmolLM2-135M" / "tokenizer.model")


@pytest.mark.parametrize("kind", ["lookup", "self-int4", "SmolLM2-135M-Instruct"])
def test_greedy_on_real_weights_is_plain_greedy(kind, smollm_dir, smollm_tokenizer, loaded, plain_greedy):
    """SmolLM2-135M's trained weights, float32: each proposer gives plain greedy's text, and drafts are accepted."""
    model = loaded(smollm_dir / "SmolLM2-135M")
    accepted = 0
    for prompt in SMOLLM_PROMPTS:
        prompt_ids = smollm_tokenizer.encode(prompt, bos=True, eos=False)
        plain, _ = plain_greedy(model, prompt_ids, smollm_tokenizer.stop_tokens)
        draft = proposer(kind, loaded, smollm_dir, "SmolLM2-135M", 4)
        assert speculative(model, draft, prompt_ids, NEW_TOKENS, smollm_tokenizer.stop_tokens) == plain
        accepted += draft.tally["accepted"]
    assert accepted > 0


BFLOAT16_DRAFTS = 4  # k in the bfloat16 comparison


def logits_of_passes(model, prompt_ids, text_ids, rows):
    """Teacher-forced: after the prompt's pass (all but its last token), the text fed in passes of `rows` tokens, as
    speculative decoding feeds the last token and its drafts when all are accepted; the logits of each position."""
    run_inference.prefill(model, prompt_ids[:-1])
    fed = prompt_ids[-1:] + text_ids[:-1]  # the token before each text token
    pos = len(prompt_ids) - 1
    return torch.cat([run_inference.verify(model, fed[start : start + rows], pos + start).float()
                      for start in range(0, len(fed), rows)])


@pytest.fixture(scope="module")
def bfloat16_runs(smollm_dir, smollm_tokenizer, loaded, plain_greedy):
    """For each prompt, in bfloat16: plain greedy's tokens, the logits each was chosen from, and the bound: the
    largest difference between those logits and the same positions' logits from passes of 2 .. k + 1 tokens."""
    model = loaded(smollm_dir / "SmolLM2-135M", torch.bfloat16)
    runs = []
    for prompt in SMOLLM_PROMPTS:
        prompt_ids = smollm_tokenizer.encode(prompt, bos=True, eos=False)
        plain, steps = plain_greedy(model, prompt_ids, smollm_tokenizer.stop_tokens)
        bound = max((logits_of_passes(model, prompt_ids, plain, rows) - steps).abs().max().item()
                    for rows in range(2, BFLOAT16_DRAFTS + 2))
        runs.append((prompt_ids, plain, steps, bound))
    return model, runs


@pytest.mark.parametrize("kind", ["lookup", "self-int4"])
def test_bfloat16_greedy_parts_from_plain_only_at_a_near_tie(kind, smollm_dir, smollm_tokenizer, loaded,
                                                            bfloat16_runs):
    """In bfloat16 a pass of k + 1 rows rounds otherwise than k + 1 one-row steps (bfloat16_runs measures by how
    much). Speculative greedy must give plain greedy's text up to the first position where plain decoding's top
    two logits are within twice that bound (where rounding may swap them), and wherever they are further apart."""
    model, runs = bfloat16_runs
    compared = 0
    for prompt_ids, plain, steps, bound in runs:
        draft = proposer(kind, loaded, smollm_dir, "SmolLM2-135M", BFLOAT16_DRAFTS, dtype=torch.bfloat16)
        ids = speculative(model, draft, prompt_ids, NEW_TOKENS, smollm_tokenizer.stop_tokens)
        top2 = steps.topk(2).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        same = next((i for i, (a, b) in enumerate(zip(ids, plain)) if a != b), min(len(ids), len(plain)))
        if same < len(plain):  # they part: only where plain decoding was within rounding of a tie
            assert margins[same] <= 2 * bound, (same, margins[same], bound)
        else:
            assert ids == plain
        compared += same
    assert compared >= NEW_TOKENS  # the comparison covered a real stretch of text


# ---------------------------------------------------------------------------------------------------------
# Sampling: the model's own distribution, whatever the proposer.
# ---------------------------------------------------------------------------------------------------------
SIGNIFICANCE = 1e-3  # the chi-square test's level: a correct rule fails it with this probability (seeds are fixed)
SAMPLING_RUNS = 300
MIN_EXPECTED = 5  # the chi-square test's usual rule: categories expected fewer times are pooled


@pytest.fixture(scope="module")
def dice_drafts_dir(tmp_path_factory, tokenizer):
    """The dice model ("Dice", conftest.DICE_LOGITS: " a" 0.5, " b" 0.3, " c" 0.14, " d" 0.05) and "Dice-Draft", a
    fixed distribution of its own (about 0.11, 0.49, 0.11, and 0.30 on " e", which the dice never rolls): a
    proposer wrong in both directions, where p / q is large (" a"), small (" b") and zero (" e")."""
    folder = tmp_path_factory.mktemp("dice_drafts")
    write_checkpoint(folder / "Dice", TINY, fixed_distribution_weights(TINY, DICE_LOGITS))
    a, b, c, e = (tokenizer.encode(text, bos=False, eos=False)[0] for text in (" a", " b", " c", " e"))
    draft_logits = {a: 22.5, b: 24.0, c: 22.5, e: 23.5}
    write_checkpoint(folder / "Dice-Draft", TINY, fixed_distribution_weights(TINY, draft_logits))
    return folder


def chi_square_p_value(draws, probabilities):
    """The probability that len(draws) draws from `probabilities` ({token: p}) are at least this far from them
    (Pearson's chi-square). Tokens expected fewer than MIN_EXPECTED times are pooled into one category."""
    total = len(draws)
    categories = {token for token, p in probabilities.items() if total * p >= MIN_EXPECTED}
    rest = lambda token: token if token in categories else "rest"
    expected = {token: total * probabilities[token] for token in categories}
    expected["rest"] = total - sum(expected.values())
    observed = {category: 0 for category in expected}
    for token in draws:
        observed[rest(token)] += 1
    statistic = sum((observed[c] - expected[c]) ** 2 / expected[c] for c in expected if expected[c] > 0)
    if observed["rest"] and expected["rest"] <= 0:
        return 0.0
    degrees = len([c for c in expected if expected[c] > 0]) - 1
    return 1 - torch.distributions.Chi2(torch.tensor(float(degrees))).cdf(torch.tensor(statistic)).item()


@pytest.mark.parametrize("kind, temperature, top_p", [("lookup", 1.0, 1.0), ("lookup", 0.7, 0.8),
                                                     ("Dice-Draft", 1.0, 1.0), ("Dice-Draft", 0.7, 0.8)])
def test_sampling_with_drafts_draws_from_the_model(kind, temperature, top_p, dice_drafts_dir, tokenizer, loaded):
    """SAMPLING_RUNS seeds, one round each with k = 3: the first and the second new token are each distributed as the
    dice's top-p distribution at that temperature (chi-square at SIGNIFICANCE). The prompt " a b c d a" gives
    prompt lookup something to propose (" b c d", which followed the earlier " a"); Dice-Draft is often wrong."""
    prompt_ids = tokenizer.encode(" a b c d a", bos=True, eos=False)
    model = loaded(dice_drafts_dir / "Dice")
    logits = torch.zeros(TINY["vocab_size"])
    logits[list(DICE_LOGITS)] = torch.tensor(list(DICE_LOGITS.values()))
    p = run_inference.top_p_probabilities(logits, temperature, top_p)
    expected = dict(enumerate(p.tolist()))
    draft = proposer(kind, loaded, dice_drafts_dir, "Dice", 3)
    firsts, seconds = [], []
    for seed in range(SAMPLING_RUNS):
        draft.sampling = (temperature, top_p, torch.Generator().manual_seed(seed))
        cached = len(prompt_ids) - 1 if seed else 0  # the prompt's pass, left in the cache by the first run
        first, second, *_ = speculative(model, draft, prompt_ids, 4, set(), cached=cached)
        firsts.append(first)
        seconds.append(second)
    assert chi_square_p_value(firsts, expected) > SIGNIFICANCE, {t: firsts.count(t) for t in set(firsts)}
    assert chi_square_p_value(seconds, expected) > SIGNIFICANCE, {t: seconds.count(t) for t in set(seconds)}
    assert draft.tally["drafted"] > draft.tally["accepted"] > 0  # both outcomes occurred


# ---------------------------------------------------------------------------------------------------------
# The draft model's own cache, and prompt lookup.
# ---------------------------------------------------------------------------------------------------------
def test_a_draft_model_drafts_what_it_would_from_scratch(drafts_dir, tokenizer, loaded):
    """Every round, the draft model's k tokens are its greedy continuation of the whole text so far, computed
    without a cache: catching up after rejections and the model's own tokens leaves its cache exact. Two texts
    in turn, as a chat that starts over: the second shares only <|begin_of_text|> with what its cache holds."""
    model = loaded(drafts_dir / "Tiny")
    draft = proposer("Tiny-Draft", loaded, drafts_dir, "Tiny", 4)
    rounds = []  # (the text so far, k, the drafts)
    propose = draft.propose

    def recording(token_ids, k):
        drafts, probabilities = propose(token_ids, k)
        rounds.append((list(token_ids), k, drafts))
        return drafts, probabilities

    draft.propose = recording
    for prompt in PROMPTS[1], PROMPTS[0]:
        speculative(model, draft, tokenizer.encode(prompt, bos=True, eos=False), NEW_TOKENS, tokenizer.stop_tokens)
    reference = reference_model(drafts_dir / "Tiny-Draft", MAX_SEQ_LEN)
    assert draft.tally["accepted"] > 0 and draft.tally["drafted"] > draft.tally["accepted"]
    for token_ids, k, drafts in rounds:
        assert drafts == greedy_without_cache(reference, token_ids, k, set())


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = run_inference.PromptLookup(3, None)
    text = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 6, 4, 2, 3]
    assert lookup.propose(text, 3) == ([7, 8, 6], None)  # "4 2 3" is new; "2 3" came last before "7 8 6"
    assert lookup.propose(text + [1], 2) == ([2, 3], None)  # "3 1" nowhere; "1": its latest occurrence, at index 6
    assert lookup.propose([5, 6, 7], 4) == ([], None)  # nothing repeats


# ---------------------------------------------------------------------------------------------------------
# Chat: both caches kept across turns.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder, draft", [("drafts_dir", "lookup"), ("drafts_dir", "Tiny-Draft"),
                                           ("stopping_dir", "lookup"), ("stopping_dir", "self-int4")])
def test_chat_with_a_proposer_replies_and_feeds_as_without(folder, draft, request, tokenizer, distributed):
    """The replies of a fresh greedy run over each whole dialog; each turn feeds the model only its new tokens.
    test_chat's stopping model ends its first reply on <|eot_id|>: a stop token among the drafts or the model's."""
    stopping, folder = folder == "stopping_dir", request.getfixturevalue(folder)
    replies, fed, _ = expected_chat(reference_model(folder / "Tiny-Instruct", 4096), tokenizer, MESSAGES[:3], 4096)
    assert len(replies[0]) < REPLY_TOKENS or not stopping  # the case under test really occurs
    result = chat(folder, MESSAGES[:3], DRAFT=draft)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(tokenizer.decode(reply) + "\n" for reply in replies)
    assert fed_per_turn(result.stderr) == fed
    turns = [line for line in result.stderr.splitlines() if line.startswith("turn ")]
    assert len(turns) == 3 and all(f"(DRAFT={draft}, DRAFT_TOKENS=" in line for line in turns)


def test_chat_keeps_the_draft_models_cache_across_turns(drafts_dir, tokenizer, loaded, monkeypatch, capsys):
    """In-process, the draft model's forward passes recorded: only the first turn's starts at position 0; later
    turns feed it only what its cache lacks. The replies are still greedy's."""
    reference = reference_model(drafts_dir / "Tiny-Instruct", MAX_SEQ_LEN)
    replies, _, restarts = expected_chat(reference, tokenizer, MESSAGES[:3], MAX_SEQ_LEN)
    assert restarts == 0
    model = loaded(drafts_dir / "Tiny-Instruct")
    draft = proposer("Tiny-Draft", loaded, drafts_dir, "Tiny-Instruct", 4)
    starts = []  # the position of each of the draft model's forward passes
    monkeypatch.setattr(run_inference, "MAX_NEW_TOKENS", REPLY_TOKENS)
    monkeypatch.setattr(run_inference, "SYSTEM_PROMPT", SYSTEM)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(message + "\n" for message in MESSAGES[:3])))
    hook = draft.model.register_forward_pre_hook(lambda module, args, kwargs: starts.append(kwargs["start_pos"]),
                                                 with_kwargs=True)
    try:
        assert run_inference.chat(model, tokenizer, run_inference.pick_greedy, "", draft) == 3
    finally:
        hook.remove()
    assert capsys.readouterr().out == "".join(tokenizer.decode(reply) + "\n" for reply in replies)
    assert starts.count(0) == 1 and len(starts) > 3


# ---------------------------------------------------------------------------------------------------------
# The script: its text, its per-token lines and its report; torchrun; bad drafts.
# ---------------------------------------------------------------------------------------------------------
REPORT = (r"speculative decoding \(DRAFT=\S+, DRAFT_TOKENS=3\): (\d+) of (\d+) drafted tokens accepted \((\d+)%\), "
          r"([\d.]+) tokens per verify pass \((\d+) passes\); the same (\d+) tokens decoded one per step took "
          r"([\d.]+) s against ([\d.]+) s: ([\d.]+)x \(measured\), the same choices")


@pytest.mark.parametrize("draft", ["lookup", "self-int4", "Tiny-Draft"])
def test_the_script_with_a_draft_prints_greedys_text_and_what_the_drafts_did(draft, drafts_dir):
    settings = dict(INPUT_STRING=PROMPTS[1], DTYPE="float32", MAX_NEW_TOKENS=24, LOOK_INSIDE=0)
    plain = run_script("run_inference.py", drafts_dir, "Tiny", **settings)
    result = run_script("run_inference.py", drafts_dir, "Tiny", DRAFT=draft, DRAFT_TOKENS=3, **settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout != ""
    assert shown_token_ids(result.stderr) == shown_token_ids(plain.stderr)
    token_lines = [line for line in result.stderr.splitlines() if line.split()[:2] and line.split()[0].isdigit()
                   and line.split()[1].isdigit()]
    notes = [line.rsplit("  [", 1)[1] for line in token_lines]
    assert all(note in ("draft accepted]", "the model's]") or note.startswith("the model's; draft ") for note in notes)
    [match] = re.findall(REPORT, result.stderr)
    accepted, drafted, percent, per_pass, passes, tokens, plain_s, spec_s, speedup = match
    assert int(accepted) == notes.count("draft accepted]") and int(drafted) >= int(accepted)
    assert int(tokens) == int(passes) + int(accepted) == 24  # each pass: its drafts kept and one token of the model's
    assert float(per_pass) == pytest.approx(24 / int(passes), abs=0.01)
    assert float(speedup) == pytest.approx(float(plain_s) / float(spec_s), rel=0.01, abs=0.006)  # as rounded
    assert f" / {float(per_pass):.2f} tokens a pass x " in result.stderr  # the bandwidth counts passes, not tokens


@pytest.mark.parametrize("settings", [{"DRAFT": "Tiny-Draft"}, {"DRAFT": "lookup", "TEMPERATURE": 0.8, "SEED": 2}],
                         ids=["draft-model", "lookup-sampling"])
def test_two_processes_decode_with_a_draft_as_one(settings, drafts_dir):
    """Under torchrun the draft model is split across the processes like the model; every process draws the same."""
    common = dict(DTYPE="float32", MAX_NEW_TOKENS=16, INPUT_STRING=PROMPTS[1], SHOW_TOKENS=0, LOOK_INSIDE=0)
    single = run_script("run_inference.py", drafts_dir, "Tiny", **common, **settings)
    assert single.returncode == 0, single.stderr
    result = torchrun(2, "run_inference.py", drafts_dir, **common, **settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout == single.stdout != ""


@pytest.fixture(scope="module")
def bad_drafts_dir(tmp_path_factory, drafts_dir):
    """The tiny model, and drafts that must be refused: their weights are the tiny model's (never loaded)."""
    folder = tmp_path_factory.mktemp("bad_drafts")
    shutil.copytree(drafts_dir / "Tiny", folder / "Tiny")
    params = json.loads((drafts_dir / "Tiny" / "params.json").read_text())
    lines = (drafts_dir / "Tiny" / "tokenizer.model").read_text().splitlines()
    lines[100], lines[101] = lines[101].split()[0] + " 100", lines[100].split()[0] + " 101"  # two tokens swapped
    variants = {"Other-Tokenizer": (params, "\n".join(lines) + "\n"),
                "Short-Context": ({**params, "use_scaled_rope": False}, None),
                "Bigger": ({**params, "dim": 2 * params["dim"]}, None),
                "Llama2-Vocabulary": ({**params, "vocab_size": 32000}, None)}
    for name, (variant_params, tokenizer_text) in variants.items():
        shutil.copytree(drafts_dir / "Tiny", folder / name)
        (folder / name / "params.json").write_text(json.dumps(variant_params))
        if tokenizer_text:
            (folder / name / "tokenizer.model").write_text(tokenizer_text)
    return folder


@pytest.mark.parametrize("settings, fragments", [
    ({"DRAFT": "Other-Tokenizer"}, ["DRAFT='Other-Tokenizer' has another tokenizer.model than Tiny"]),
    ({"DRAFT": "Short-Context"}, ["DRAFT='Short-Context' has a context of 8192 tokens and Tiny one of 131072"]),
    ({"DRAFT": "Bigger"}, ["DRAFT='Bigger' has", "billion parameters, more than Tiny's", "choose a smaller one"]),
    ({"DRAFT": "Llama2-Vocabulary"}, ["Llama2-Vocabulary looks like Llama 2"]),
    ({"DRAFT": "Nowhere"}, ["Nowhere not found", "Tiny"]),
    ({"DRAFT": "lookup", "DRAFT_TOKENS": 0}, ["DRAFT_TOKENS=0 is out of range: it must be at least 1"]),
    ({"DRAFT": "lookup", "DRAFT_TOKENS": 256},  # a verify pass is one prompt chunk at most (PREFILL_CHUNK = 256)
     ["DRAFT_TOKENS=256 is out of range: it must be at least 1 and at most 255"]),
    ({"DRAFT": "lookup", "DRAFT_TOKENS": "four"}, ["DRAFT_TOKENS='four' is not a valid int"]),
    ({"DRAFT": "lookup", "BEAM_WIDTH": 2}, ["DRAFT='lookup' speeds up greedy decoding and sampling, not beam search"]),
    ({"DRAFT": "self-int4", "SPEEDUPS": 0}, ["DRAFT=self-int4 needs SPEEDUPS=1 and a CPU"]),
    ({"DRAFT": "lookup", "DRAFT_MEASURE": 2}, ["DRAFT_MEASURE=2 is not supported"]),
])
def test_a_bad_draft_is_one_line_before_anything_loads(settings, fragments, bad_drafts_dir):
    result = run_script("run_inference.py", bad_drafts_dir, "Tiny", **settings)
    fails_with(result, *fragments)
    assert "loaded " not in result.stderr and "Loading checkpoint" not in result.stderr

"""run_inference.py's three ways of choosing tokens: greedy, beam search and top-p sampling.

Sampling is checked on the dice model (conftest.DICE_LOGITS), whose next-token distribution is known and the
same at every step: the draws through the script show which tokens top-p and the temperature allow."""

import pytest
import torch
import torch.nn.functional as F

import minimal_run_inference
import run_inference
from speedups import calibration
from conftest import (CPU, dice_probabilities, greedy_without_cache, load as load_script, reference_model,
                      run_script, shown_token_ids)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return run_inference.encode_prompt(tokenizer, PROMPT, "", instruct=False)


def load(models_dir, prompt_ids, max_new_tokens, batch, module=run_inference, **options):
    return load_script(module, models_dir / "Tiny", len(prompt_ids) + max_new_tokens, batch=batch, **options)


def test_beam_width_1_is_greedy(models_dir, tokenizer, prompt_ids, distributed):
    model = load(models_dir, prompt_ids, 20, batch=1)
    greedy = list(run_inference.generate(model, prompt_ids, 20, tokenizer.stop_tokens))
    [(score, beam)] = run_inference.beam_search(model, prompt_ids, 20, tokenizer.stop_tokens,
                                                beam_width=1, length_penalty=1.0)
    assert len(greedy) == 20 and beam == greedy
    result = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=PROMPT, DTYPE="float32",
                        MAX_NEW_TOKENS=20, BEAM_WIDTH=1)
    assert result.returncode == 0 and result.stdout == tokenizer.decode(greedy)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_score_is_the_sum_of_token_log_probs(length_penalty, models_dir, tokenizer, prompt_ids, distributed):
    """The reported score, recomputed by one cache-free pass over prompt + sequence."""
    new_tokens, k = 16, 4
    finished = run_inference.beam_search(load(models_dir, prompt_ids, new_tokens, batch=k), prompt_ids, new_tokens,
                                         tokenizer.stop_tokens, beam_width=k, length_penalty=length_penalty)
    assert len(finished) == k
    assert [score for score, _ in finished] == sorted((score for score, _ in finished), reverse=True)
    reference = load(models_dir, prompt_ids, new_tokens, 1, minimal_run_inference, use_speedups=False)  # all positions
    for score, token_ids in finished:
        logits = reference(torch.tensor([prompt_ids + token_ids]), start_pos=0)[0]  # (len, vocab)
        log_probs = F.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        total = log_probs.gather(1, torch.tensor(token_ids)[:, None]).sum().item()
        assert score == pytest.approx(total / len(token_ids) ** length_penalty, abs=1e-4)


def beams_without_cache(model, prompt_ids, beam_width, steps):
    """Beam search spelled out, no cache, no batching: at every step each live sequence is scored by a pass
    over prompt + sequence, extended by each of its beam_width best tokens (no other extension can be among
    the beam_width best overall), and the beam_width best total log-probabilities survive."""
    beams = [([], 0.0)]
    for _ in range(steps):
        candidates = []
        for sequence, score in beams:
            log_probs = F.log_softmax(model(torch.tensor([prompt_ids + sequence]), 0)[0, -1].float(), dim=-1)
            top = log_probs.topk(beam_width)
            candidates += [(sequence + [t], score + lp) for lp, t in zip(top.values.tolist(), top.indices.tolist())]
        beams = sorted(candidates, key=lambda candidate: -candidate[1])[:beam_width]
    return beams


def greedy_runs(model, prompt_ids, beam_width, steps):
    """What the original project called beam search: the beam_width best first tokens, each continued greedily."""
    first = F.log_softmax(model(torch.tensor([prompt_ids]), 0)[0, -1].float(), dim=-1).topk(beam_width).indices
    return [[t] + greedy_without_cache(model, prompt_ids + [t], steps - 1, set()) for t in first.tolist()]


def test_beam_search_keeps_the_k_best_sequences_at_every_step(models_dir, prompt_ids, distributed):
    """With the length penalty off and no stop token, beam search's k results are exactly the reference's;
    k greedy runs find other sequences on this model (checked), so they would fail."""
    k, steps = 3, 4
    reference = reference_model(models_dir / "Tiny", len(prompt_ids) + steps)
    expected = beams_without_cache(reference, prompt_ids, k, steps)
    assert sorted(ids for ids, _ in expected) != sorted(greedy_runs(reference, prompt_ids, k, steps))
    model = load(models_dir, prompt_ids, steps, batch=k)
    finished = run_inference.beam_search(model, prompt_ids, steps, set(), k, length_penalty=0.0)
    assert [ids for _, ids in finished] == [ids for ids, _ in expected]
    assert [score for score, _ in finished] == pytest.approx([score for _, score in expected], abs=1e-4)


def test_num_return_sequences_prints_best_first_separated_by_a_blank_line(models_dir, tokenizer, prompt_ids,
                                                                          distributed):
    k, new_tokens = 3, 10
    finished = run_inference.beam_search(load(models_dir, prompt_ids, new_tokens, batch=k), prompt_ids, new_tokens,
                                         tokenizer.stop_tokens, beam_width=k, length_penalty=1.0)
    result = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=PROMPT, DTYPE="float32",
                        MAX_NEW_TOKENS=new_tokens, BEAM_WIDTH=k, NUM_RETURN_SEQUENCES=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n\n".join(tokenizer.decode(ids) for _, ids in finished[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_plain_weights_beams(dtype, models_dir, confident_dir, tokenizer, prompt_ids,
                                                     distributed, monkeypatch):
    """On x86 CPUs load_model packs the weights for oneDNN when several sequences run per step; beam search must
    find what it finds with the plain weights (in bfloat16 on the confident model, where rounding cannot
    reorder near-equal candidates)."""
    if not calibration.packs_weights(CPU, dtype, 4):
        pytest.skip(f"this CPU has no oneDNN {dtype} kernels to pack for: beam search uses the plain weights")
    new_tokens, k = 16, 4
    folder = models_dir if dtype == torch.float32 else confident_dir

    def beams():
        model = load_script(run_inference, folder / "Tiny", len(prompt_ids) + new_tokens, dtype, k)
        finished = run_inference.beam_search(model, prompt_ids, new_tokens, tokenizer.stop_tokens, k, 1.0)
        return model.output.layer.weight.is_mkldnn, [ids for _, ids in finished], [score for score, _ in finished]

    packed, packed_ids, packed_scores = beams()
    monkeypatch.setattr(calibration, "packs_weights", lambda device, dtype, rows: False)
    plain, plain_ids, plain_scores = beams()
    assert packed and not plain
    assert packed_ids == plain_ids
    assert packed_scores == pytest.approx(plain_scores, abs=1e-4 if dtype == torch.float32 else 2e-2)


def sampled(models_dir, **settings):
    result = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=PROMPT, DTYPE="float32",
                        MAX_NEW_TOKENS=16, TOP_P=1.0, **settings)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("temperature", [1e-4, 1e-40])  # 1e-40: logits / temperature overflow to inf
def test_sampling_near_zero_temperature_is_greedy(temperature, models_dir, tokenizer, prompt_ids, distributed):
    model = load(models_dir, prompt_ids, 16, batch=1, module=minimal_run_inference)
    greedy = greedy_without_cache(model, prompt_ids, 16, tokenizer.stop_tokens)
    assert sampled(models_dir, TEMPERATURE=temperature, SEED=3) == tokenizer.decode(greedy)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = {run_inference.sample_top_p(logits, 1.0, 0.7, generator) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it; the rest is cut
    draws = {run_inference.sample_top_p(logits, 1.0, 1.0, generator) for _ in range(400)}
    assert draws == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.7), (1.0, 1.0), (0.5, 1.0)])
def test_the_script_samples_from_the_nucleus_at_its_temperature(temperature, top_p, dice_dir):
    """200 draws from the dice model through the script: only the nucleus's tokens, in about the proportions
    of the distribution at that temperature, renormalised over the nucleus (within 0.1; the seed is fixed,
    so the draws are the same every run)."""
    result = run_script("run_inference.py", dice_dir, "Dice", TEMPERATURE=temperature, TOP_P=top_p, SEED=3,
                        MAX_NEW_TOKENS=200, SHOW_TOKENS=1)
    assert result.returncode == 0, result.stderr
    draws = shown_token_ids(result.stderr)
    tempered = {t: p ** (1 / temperature) for t, p in dice_probabilities().items()}
    nucleus, mass = [], 0.0
    for token, p in sorted(tempered.items(), key=lambda item: -item[1]):
        if mass < top_p * sum(tempered.values()):
            nucleus.append(token)
            mass += p
    assert len(draws) == 200 and set(draws) <= set(nucleus)
    for token in nucleus:
        share = tempered[token] / mass
        assert abs(draws.count(token) / len(draws) - share) < 0.1
        assert token in draws or share < 0.05
    if top_p == temperature == 1.0:  # another seed, other draws (the same seed's are checked in test_bad_input)
        other = run_script("run_inference.py", dice_dir, "Dice", TEMPERATURE=1.0, TOP_P=1.0, SEED=4,
                           MAX_NEW_TOKENS=200, SHOW_TOKENS=1)
        assert shown_token_ids(other.stderr) != draws


@pytest.mark.parametrize("settings, message", [
    ({"BEAM_WIDTH": 0}, "BEAM_WIDTH=0 is out of range: it must be at least 1"),
    ({"BEAM_WIDTH": 2, "NUM_RETURN_SEQUENCES": 3},
     "NUM_RETURN_SEQUENCES=3 is out of range: it must be at least 1 and at most 2"),
    ({"TOP_P": 1.5, "TEMPERATURE": 0.6}, "TOP_P=1.5 is out of range: it must be in (0, 1]"),
    ({"TEMPERATURE": -1}, "TEMPERATURE=-1.0 is out of range: it must be at least 0.0"),
    ({"BEAM_WIDTH": "two"}, "BEAM_WIDTH='two' is not a valid int"),
    ({"BEAM_WIDTH": 2, "TEMPERATURE": 0.5}, "choose beam search (BEAM_WIDTH > 1) or sampling (TEMPERATURE > 0)"),
    ({"TEMPERATURE": "nan"}, "TEMPERATURE=nan is out of range: it must be at least 0.0"),
    ({"TEMPERATURE": "inf"}, "TEMPERATURE=inf is out of range: it must be at least 0.0"),
    ({"LENGTH_PENALTY": "-inf"}, "LENGTH_PENALTY=-inf is out of range: it must be a finite number"),
    ({"TOP_P": "nan", "TEMPERATURE": 0.6}, "TOP_P=nan is out of range: it must be in (0, 1]"),
    ({"BEAM_WIDTH": 40000}, "BEAM_WIDTH=40000 is out of range: it must be at least 1 and at most 32064"),
    ({"SHOWN_ALTERNATIVES": -1}, "SHOWN_ALTERNATIVES=-1 is out of range: it must be at least 0 and at most 128255"),
])
def test_bad_strategy_settings_are_one_clear_line(settings, message, models_dir):
    result = run_script("run_inference.py", models_dir, "Tiny", **settings)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1

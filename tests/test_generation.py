"""run_inference.py's three ways of choosing tokens: greedy, beam search and top-p sampling."""

import pytest
import torch
import torch.nn.functional as F

import minimal_run_inference
import run_inference
import speedups
from conftest import CPU, greedy_without_cache, load as load_script, run_script

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return run_inference.encode_prompt(tokenizer, PROMPT, "", instruct=False)


def load(models_dir, prompt_ids, max_new_tokens, batch, module=run_inference, **options):
    return load_script(module, models_dir / "Tiny", len(prompt_ids) + max_new_tokens, batch=batch, **options)


def test_beam_width_1_is_greedy(models_dir, tokenizer, prompt_ids, distributed):
    model = load(models_dir, prompt_ids, 20, batch=1)
    greedy = list(run_inference.generate(model, prompt_ids, 20, tokenizer.stop_tokens, CPU))
    [(score, beam)] = run_inference.beam_search(model, prompt_ids, 20, tokenizer.stop_tokens, CPU,
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
                                         tokenizer.stop_tokens, CPU, beam_width=k, length_penalty=length_penalty)
    assert len(finished) == k
    assert [score for score, _ in finished] == sorted((score for score, _ in finished), reverse=True)
    reference = load(models_dir, prompt_ids, new_tokens, 1, minimal_run_inference, use_speedups=False)  # all positions
    for score, token_ids in finished:
        logits = reference(torch.tensor([prompt_ids + token_ids]), start_pos=0)[0]  # (len, vocab)
        log_probs = F.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        total = log_probs.gather(1, torch.tensor(token_ids)[:, None]).sum().item()
        assert score == pytest.approx(total / len(token_ids) ** length_penalty, abs=1e-4)


def test_beam_search_finds_a_more_probable_text_than_greedy(models_dir, tokenizer, prompt_ids, distributed):
    """With the length penalty off, beam search's best total log-probability is at least greedy's."""
    new_tokens = 12
    model = load(models_dir, prompt_ids, new_tokens, batch=4)
    greedy = list(run_inference.generate(model, prompt_ids, new_tokens, tokenizer.stop_tokens, CPU))
    [(best, _), *_] = run_inference.beam_search(model, prompt_ids, new_tokens, tokenizer.stop_tokens, CPU,
                                                beam_width=4, length_penalty=0.0)
    logits = load(models_dir, prompt_ids, new_tokens, 1, minimal_run_inference, use_speedups=False)(torch.tensor([prompt_ids + greedy]), 0)[0]
    greedy_total = F.log_softmax(logits[len(prompt_ids) - 1:-1], -1).gather(1, torch.tensor(greedy)[:, None]).sum()
    assert best >= greedy_total.item() - 1e-4


def test_num_return_sequences_prints_best_first_separated_by_a_blank_line(models_dir, tokenizer, prompt_ids, distributed):
    k, new_tokens = 3, 10
    finished = run_inference.beam_search(load(models_dir, prompt_ids, new_tokens, batch=k), prompt_ids, new_tokens,
                                         tokenizer.stop_tokens, CPU, beam_width=k, length_penalty=1.0)
    result = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=PROMPT, DTYPE="float32",
                        MAX_NEW_TOKENS=new_tokens, BEAM_WIDTH=k, NUM_RETURN_SEQUENCES=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n\n".join(tokenizer.decode(ids) for _, ids in finished[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_plain_weights_beams(dtype, models_dir, tokenizer, prompt_ids, distributed, monkeypatch):
    """On x86 CPUs load_model packs the weights for oneDNN when several sequences run per step; beam search must
    find exactly what it finds with the plain weights."""
    if not speedups.packs_weights(CPU, dtype, 4):
        pytest.skip(f"this CPU has no oneDNN {dtype} kernels to pack for: beam search uses the plain weights")
    new_tokens, k = 16, 4

    def beams():
        model = load_script(run_inference, models_dir / "Tiny", len(prompt_ids) + new_tokens, dtype, k)
        finished = run_inference.beam_search(model, prompt_ids, new_tokens, tokenizer.stop_tokens, CPU, k, 1.0)
        return model.output.layer.weight.is_mkldnn, [ids for _, ids in finished], [score for score, _ in finished]

    packed, packed_ids, packed_scores = beams()
    monkeypatch.setattr(speedups, "packs_weights", lambda device, dtype, rows: False)
    plain, plain_ids, plain_scores = beams()
    assert packed and not plain
    assert packed_ids == plain_ids
    assert packed_scores == pytest.approx(plain_scores, abs=1e-4 if dtype == torch.float32 else 2e-2)


def sampled(models_dir, **settings):
    result = run_script("run_inference.py", models_dir, "Tiny", INPUT_STRING=PROMPT, DTYPE="float32",
                        MAX_NEW_TOKENS=16, TOP_P=1.0, **settings)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sampling_is_reproducible_by_seed(models_dir):
    # At temperature 3 the tiny model's distribution is nearly flat over 128,256 tokens: two seeds
    # drawing the same 16 tokens is as good as impossible.
    first = sampled(models_dir, TEMPERATURE=3.0, SEED=1)
    assert first == sampled(models_dir, TEMPERATURE=3.0, SEED=1)
    assert first != sampled(models_dir, TEMPERATURE=3.0, SEED=2)


def test_sampling_near_zero_temperature_is_greedy(models_dir, tokenizer, prompt_ids, distributed):
    model = load(models_dir, prompt_ids, 16, batch=1, module=minimal_run_inference)
    greedy = greedy_without_cache(model, prompt_ids, 16, tokenizer.stop_tokens)
    assert sampled(models_dir, TEMPERATURE=1e-4, SEED=3) == tokenizer.decode(greedy)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = {run_inference.sample_top_p(logits, 1.0, 0.7, generator) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it; the rest is cut
    draws = {run_inference.sample_top_p(logits, 1.0, 1.0, generator) for _ in range(400)}
    assert draws == {0, 1, 2, 3}


@pytest.mark.parametrize("settings, message", [
    ({"BEAM_WIDTH": 0}, "BEAM_WIDTH=0 is out of range: it must be at least 1"),
    ({"BEAM_WIDTH": 2, "NUM_RETURN_SEQUENCES": 3}, "NUM_RETURN_SEQUENCES=3 is out of range: it must be at least 1 and at most 2"),
    ({"TOP_P": 1.5, "TEMPERATURE": 0.6}, "TOP_P=1.5 is out of range: it must be in (0, 1]"),
    ({"TEMPERATURE": -1}, "TEMPERATURE=-1.0 is out of range: it must be at least 0.0"),
    ({"BEAM_WIDTH": "two"}, "BEAM_WIDTH='two' is not a valid int"),
    ({"BEAM_WIDTH": 2, "TEMPERATURE": 0.5}, "choose beam search (BEAM_WIDTH > 1) or sampling (TEMPERATURE > 0)"),
])
def test_bad_strategy_settings_are_one_clear_line(settings, message, models_dir):
    result = run_script("run_inference.py", models_dir, "Tiny", **settings)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1

"""run_inference.py's 8-bit weights (QUANTIZE=int8): exact quantisation arithmetic, a small logit error,
and unchanged greedy text on a model with confident predictions."""

import pytest
import torch

import run_inference
import speedups
from conftest import CPU, load, run_script
from random_checkpoint import TINY, write_checkpoint

PROMPT_TOKENS = 64


def test_quantize_int8_by_hand():
    weight = torch.tensor([[1.0, -0.5, 0.25], [2.0, 4.0, -8.0]])
    int8, scales, _ = speedups.quantize_int8(weight)
    assert scales.tolist() == pytest.approx([1 / 127, 8 / 127])
    # row 0: 1, -0.5, 0.25 times 127 = 127, -63.5, 31.75; row 1 times 127 / 8 = 31.75, 63.5, -127
    # (torch.round rounds halves to even: -63.5 -> -64, 63.5 -> 64)
    assert int8.dtype == torch.int8
    assert int8.tolist() == [[127, -64, 32], [32, 64, -127]]
    error = (int8.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()  # at most half a step per weight


@pytest.fixture(scope="module")
def successor(tiny_weights):
    """A random successor for every token of the vocabulary."""
    return torch.randperm(TINY["vocab_size"], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def confident_dir(tmp_path_factory, tiny_weights, successor):
    """The tiny model made confident, as a trained model is: large embeddings dominate the hidden state,
    and the output row of each token's successor is that token's embedding, so the model predicts the
    successor of the last token by a wide margin."""
    embeddings = 3 * torch.randn(TINY["vocab_size"], TINY["dim"], generator=torch.Generator().manual_seed(2))
    output = torch.empty_like(embeddings)
    output[successor] = embeddings
    weights = {**tiny_weights, "tok_embeddings.weight": embeddings.to(torch.bfloat16),
               "output.weight": output.to(torch.bfloat16)}
    folder = tmp_path_factory.mktemp("confident")
    write_checkpoint(folder / "Tiny", TINY, weights)
    return folder


def logits_along(model, prompt_ids, continuation):
    """The next-token logits after the prompt and after each token of `continuation`, through the cache."""
    rows = [run_inference.prefill(model, prompt_ids, CPU)]
    for step, token_id in enumerate(continuation):
        rows.append(run_inference.decode_step(model, [token_id], len(prompt_ids) + step, CPU)[0])
    return torch.stack(rows).float()


def test_int8_logits_are_close_to_bfloat16_and_greedy_text_is_unchanged(confident_dir, successor, tokenizer,
                                                                        distributed):
    prompt_ids = tokenizer.encode("the quick brown fox " * 20, bos=True, eos=False)[:PROMPT_TOKENS]
    models = {q: load(run_inference, confident_dir / "Tiny", PROMPT_TOKENS + 24, torch.bfloat16, quantize=q)
              for q in ("", "int8")}
    assert models["int8"].layers[0].feed_forward.w1.weight.dtype == torch.int8
    greedy = {q: list(run_inference.generate(m, prompt_ids, 24, tokenizer.stop_tokens, CPU)) for q, m in models.items()}
    chain = [successor[prompt_ids[-1]].item()]
    while len(chain) < 24:
        chain.append(successor[chain[-1]].item())
    assert greedy[""] == chain  # the bfloat16 model is as confident as intended
    assert greedy["int8"] == greedy[""]

    exact, approx = (logits_along(models[q], prompt_ids, greedy[""][:-1]) for q in ("", "int8"))
    relative_error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()
    assert 0 < relative_error < 0.02  # measured about 1%: 8-bit weights, one scale per row


def test_int8_run_prints_the_same_text_and_reports_the_layer_error(confident_dir):
    bf16, int8 = (run_script("run_inference.py", confident_dir, "Tiny", MAX_NEW_TOKENS=16, QUANTIZE=q)
                  for q in ("", "int8"))
    assert int8.returncode == 0, int8.stderr
    assert int8.stdout == bf16.stdout != ""
    assert "Int8Linear" in int8.stderr and "quantised weights' relative error" in int8.stderr


def test_unknown_quantize_value(models_dir):
    result = run_script("run_inference.py", models_dir, "Tiny", QUANTIZE="int3")
    assert result.returncode != 0 and result.stdout == ""
    assert "QUANTIZE='int3' is not supported" in result.stderr

"""8- and 4-bit weights (QUANTIZE=int8 / int4, Int8Linear / Int4Linear): the quantisation arithmetic
by hand, logits within a stated error of bfloat16's on both sides of the int8 kernel's row limit, the same
greedy text and beams on a model with confident predictions, and the scripts run as a user runs them."""

import pytest
import torch

import minimal_run_inference
import run_inference
import speedups
from speedups import calibration, kernels, layouts, native
from conftest import load, run_script
import fairscale.nn.model_parallel.layers as fairscale_layers
from test_independent import random_prompt

# Mean relative error of the logits against bfloat16's (|q - bf16| / |bf16| per position), on the
# confident tiny model. int8 with one scale per row: about 1% per layer (its weight error); int4 with a
# scale and an offset per 32 weights: about 8% per layer. The bounds leave room for the rounding of a
# different model, and are far below what a broken kernel gives (a dropped scale: 100% and more).
LOGIT_ERROR_BOUND = {"int8": 0.03, "int4": 0.25}
CHUNK = 65  # rows in a prompt chunk here: more than the few rows of beam search


def test_quantize_int8_by_hand():
    weight = torch.tensor([[1.0, -0.5, 0.25], [2.0, 4.0, -8.0]])
    int8, scales, relative_error = layouts.quantize_int8(weight)
    assert scales.tolist() == pytest.approx([1 / 127, 8 / 127])
    # row 0: 1, -0.5, 0.25 times 127 = 127, -63.5, 31.75; row 1 times 127 / 8 = 31.75, 63.5, -127
    # (torch.round rounds halves to even: -63.5 -> -64, 63.5 -> 64)
    assert int8.dtype == torch.int8
    assert int8.tolist() == [[127, -64, 32], [32, 64, -127]]
    approximation = int8.float() * scales[:, None]
    assert ((approximation - weight).abs() <= scales[:, None] / 2 + 1e-7).all()  # at most half a step per weight
    # the error is measured on every ERROR_SAMPLE-th row: here row 0 alone
    assert relative_error == pytest.approx(((approximation - weight)[0].norm() / weight[0].norm()).item())


def test_quantize_int4_by_hand():
    """One row of 32 weights 0, 1, ..., 31 (minimum 0, scale 31 / 15): codes round(w * 15 / 31); the kernel
    multiplies by (code - 8) * scale + zero, zero = minimum + 8 * scale."""
    weight = torch.arange(32.0).repeat(16, 1)  # the kernel packs 16 rows at a time
    packed, scales_and_zeros, _ = layouts.quantize_int4(weight)
    scale = 31 / 15
    assert scales_and_zeros.shape == (1, 16, 2)
    assert scales_and_zeros[0, 0].tolist() == pytest.approx([scale, 8 * scale])
    codes = (weight[0] / scale).round()
    x = torch.eye(32)  # the kernel on the identity: every weight, dequantised
    dequantised = torch._weight_int4pack_mm_for_cpu(x, packed, layouts.INT4_GROUP, scales_and_zeros)[:, 0]
    assert dequantised.tolist() == pytest.approx((codes * scale).tolist(), abs=1e-5)
    assert (dequantised - weight[0]).abs().max() <= scale / 2 + 1e-5


def test_widened_products_outside_inference_mode_share_their_buffer(distributed):
    """Prompt chunks widen weights into one buffer that every layer shares. A product outside inference mode on
    a weight that requires grad (a user's own loop; a test's layer) must leave the buffer out of autograd: the
    next product writes into it, and would fail if it were part of a graph."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=generator)
    modules = []
    for kernel, layout in [("linear-f32", layouts.PlainLinear), ("w8-f32", layouts.Int8Linear)]:
        layer = fairscale_layers.ColumnParallelLinear(64, 96, bias=False, gather_output=False)
        layer.weight = torch.nn.Parameter(torch.randn(96, 64, generator=generator))  # requires grad
        module = layout(layer)
        kernels.use(module, dict.fromkeys(layouts.ROW_CLASSES, kernel), 5)
        modules.append((module, module.dequantized(96)))  # float32 values of its weight (8-bit: its codes x scales)
    for module, weight in modules * 2:
        torch.testing.assert_close(module(x), x @ weight.detach().T, rtol=1e-5, atol=1e-4)


def our_4_bit_layer(in_features, kernel, generator):
    """A 96-row layer of random weights in our 4-bit layout, `kernel` for every number of rows (a skip where our
    kernels are not built)."""
    if native.library() is None:
        pytest.skip(f"our kernels: not available ({native.why_unavailable()})")
    layer = fairscale_layers.ColumnParallelLinear(in_features, 96, bias=False, gather_output=False)
    layer.weight = torch.nn.Parameter(torch.randn(96, in_features, generator=generator), requires_grad=False)
    module = layouts.BlockInt4Linear(layer)
    kernels.use(module, dict.fromkeys(layouts.ROW_CLASSES, kernel), 5)
    return module


@pytest.mark.parametrize("kernel, dtype, bound", [("q4-f32", torch.float32, 1e-5), ("q4-f32", torch.bfloat16, 0.01),
                                                  ("q4-bf16", torch.bfloat16, 0.01)])
def test_our_4_bit_chunk_kernels_give_the_product_of_the_4_bit_weights(kernel, dtype, bound, distributed):
    """A prompt chunk (40 rows, two widened blocks: WIDEN_ELEMENTS made small) on our 4-bit layout: x times the
    4-bit weights, to float32's rounding, or bfloat16's (x, the widened weights and the result each rounded
    once: within 1% of the largest entry)."""
    generator = torch.Generator().manual_seed(0)
    module = our_4_bit_layer(64, kernel, generator)
    x = torch.randn(40, 64, generator=generator).to(dtype)
    expected = x.float() @ module.dequantized(96).T
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "WIDEN_ELEMENTS", 50 * 64)  # rows 0-49, then 50-95
        patch.setattr(kernels, "WIDENED", kernels.WideningBuffer())
        out = module(x)
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max() <= bound * expected.abs().max()


@pytest.mark.parametrize("kernel, rows, tolerance", [("q4", 1, 0), ("q4", 5, 0), ("q4-f32", 40, 1e-5)])
def test_rows_of_our_4_bit_layout_give_those_rows_of_its_product(kernel, rows, tolerance, distributed):
    """rows_view (wq of wqkv in run_inference's layer_by_hand): views of some whole tiles of 16 rows of the
    layer's buffer, read by the same kernel, give those outputs of the whole layer: exactly with integer
    products, to float32's rounding where the rows are widened and multiplied by PyTorch (its summation order
    may follow the shape). Rows that cut a tile have no view (RowsOf then cuts the whole product)."""
    generator = torch.Generator().manual_seed(0)
    module = our_4_bit_layer(100, kernel, generator)
    x = torch.randn(rows, 100, generator=generator)
    whole = module(x)
    assert module.rows_view(32, 40) is None and module.rows_view(8, 32) is None
    for start, end in [(0, 32), (32, 48), (48, 96)]:
        view = module.rows_view(start, end)
        part = module.kernels[layouts.row_class(rows, 5)].run(view, x)
        torch.testing.assert_close(part, whole[:, start:end], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 5, CHUNK])
@pytest.mark.parametrize("kernel", ["w8", "w8-copy", "w8-f32", "w8a8", "w8a8-onednn"])
def test_every_int8_kernel_gives_the_product_of_the_8_bit_weights_or_is_never_chosen(kernel, rows, distributed):
    """Each int8 kernel that speedups may choose computes x @ (int8 * scale).T: the int8-weight kernel and the
    16-bit copy to bfloat16's rounding, int8 x int8 within the 8-bit rounding of the activations. Where one
    is wrong on this CPU (int8 x int8 through oneDNN without VNNI sums pairs of products in 16 bits, which
    saturate: 7-9% off), speedups' trial before timing must find it wrong, so that it is never chosen."""
    generator = torch.Generator().manual_seed(0)
    layer = fairscale_layers.ColumnParallelLinear(64, 96, bias=False, gather_output=False)
    layer.weight = torch.nn.Parameter(torch.randn(96, 64, generator=generator), requires_grad=False)
    x = torch.randn(rows, 64, generator=generator)
    module = int8 = layouts.Int8Linear(layer).to(torch.bfloat16)
    if kernels.KERNELS[kernel].layout is layouts.PackedInt8Linear:
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN in this PyTorch build")
        module = layouts.PackedInt8Linear(int8, torch.bfloat16, rows)
    expected = x @ (int8.weight.float() * int8.scales.float()[:, None]).T
    kernels.use(module, dict.fromkeys(layouts.ROW_CLASSES, kernel), 5)
    out = module(x.to(torch.bfloat16)).float()
    bound = 0.02 if kernels.KERNELS[kernel].input_rounding else 0.01  # activations' 8 bits: about 0.5% an entry
    error = ((out - expected).norm() / expected.norm()).item()
    if error >= bound:
        trial = calibration.vet(kernels.KERNELS[kernel], module, int8, rows, torch.bfloat16)
        assert trial and trial.startswith("wrong here"), f"{error:.1%} off, and the trial says {trial}"


def logits_along(model, script, ids, chunk):
    """Logits after each chunk of `ids` (the last position of each), fed through the cache as prefill feeds them."""
    return torch.stack([script.prefill(model, ids[start : start + chunk], start).float()
                        for start in range(0, len(ids), chunk)])


@pytest.mark.parametrize("quantize, forced, layout", [
    ("int8", "rule", layouts.Int8Linear),  # the int8-weight kernel, a 16-bit copy for chunks
    ("int8", "w8a8", layouts.Int8Linear),  # int8 x int8, activations rounded per token
    ("int8", "w8a8-onednn", layouts.PackedInt8Linear),
    ("int4", "rule", layouts.Int4Linear)])
def test_quantized_logits_are_close_to_bfloat16(quantize, forced, layout, confident_dir, tokenizer, distributed):
    """A 130-token prompt fed in chunks of 65 tokens, then one token at a time, both compared with bfloat16
    at the same positions."""
    ids = random_prompt(tokenizer, 2 * CHUNK, seed=7)
    models = {q: load(run_inference, confident_dir / "Tiny", len(ids), torch.bfloat16, quantize=q)
              for q in ("", quantize)}
    models[quantize] = load(run_inference, confident_dir / "Tiny", len(ids), torch.bfloat16, quantize=quantize,
                            kernels=forced)
    fused = models[quantize].layers[0].feed_forward.w13
    if type(fused) is not layout:  # a forced kernel is tried first: oneDNN's int8 x int8 is wrong without VNNI
        assert forced == "w8a8-onednn" and "wrong here" in speedups.describe(models[quantize])
    for chunk in (CHUNK, 1):  # each pass writes the cache from position 0 again
        exact, approx = (logits_along(models[q], run_inference, ids, chunk) for q in ("", quantize))
        relative_error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()
        assert 0 < relative_error < LOGIT_ERROR_BOUND[quantize], f"chunks of {chunk}: {relative_error:.2%}"


def successor_chain(successor, first, length):
    chain = [successor[first].item()]
    while len(chain) < length:
        chain.append(successor[chain[-1]].item())
    return chain


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_greedy_text_and_beams_equal_bfloat16s(quantize, confident_dir, successor, tokenizer, distributed):
    prompt_ids = tokenizer.encode("the quick brown fox " * 20, bos=True, eos=False)[:64]
    greedy, beams = {}, {}
    for q in ("", quantize):
        model = load(run_inference, confident_dir / "Tiny", 64 + 24, torch.bfloat16, quantize=q)
        greedy[q] = list(run_inference.generate(model, prompt_ids, 24, tokenizer.stop_tokens))
        model = load(run_inference, confident_dir / "Tiny", 64 + 12, torch.bfloat16, batch=3, quantize=q)
        beams[q] = run_inference.beam_search(model, prompt_ids, 12, tokenizer.stop_tokens, 3, 1.0)
    assert greedy[""] == successor_chain(successor, prompt_ids[-1], 24)  # the model is as confident as intended
    assert greedy[quantize] == greedy[""]
    # The best beam follows the confident predictions; the others are runners-up with small margins, which
    # int8's 1% error keeps in order here and int4's 8% need not.
    compared = len(beams[""]) if quantize == "int8" else 1
    assert [ids for _, ids in beams[quantize]][:compared] == [ids for _, ids in beams[""]][:compared]
    assert [score for score, _ in beams[quantize]][:compared] == \
        pytest.approx([score for score, _ in beams[""]][:compared], rel=0.1, abs=0.05)


@pytest.mark.parametrize("script, quantize", [(minimal_run_inference, "int4"), (run_inference, "int8")],
                         ids=["minimal-int4", "tutorial-int8"])
def test_a_quantized_run_prints_the_bfloat16_text(script, quantize, confident_dir, tokenizer, distributed):
    prompt_ids = script.encode_prompt(tokenizer, script.INPUT_STRING, "", instruct=False)
    model = load(script, confident_dir / "Tiny", len(prompt_ids) + 16, torch.bfloat16)
    expected = tokenizer.decode(list(script.generate(model, prompt_ids, 16, tokenizer.stop_tokens)))
    result = run_script(f"{script.__name__}.py", confident_dir, "Tiny", MAX_NEW_TOKENS=16, QUANTIZE=quantize)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected != ""
    if script is run_inference:
        assert "Int8Linear" in result.stderr and "quantised weights' relative error" in result.stderr


@pytest.mark.parametrize("settings, message", [
    ({"QUANTIZE": "int3"}, "QUANTIZE='int3' is not supported; choose one of: '', 'int8', 'int4'"),
    ({"QUANTIZE": "int8", "SPEEDUPS": 0}, "QUANTIZE='int8' needs SPEEDUPS=1"),
])
def test_bad_quantize_settings(settings, message, models_dir):
    result = run_script("run_inference.py", models_dir, "Tiny", **settings)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_int4_is_refused_on_other_devices(models_dir):
    from support import checkpoint, memory
    with pytest.raises(SystemExit, match="QUANTIZE='int4' runs on CPUs only"):
        memory.check_job(models_dir / "Tiny", checkpoint.read_params(models_dir / "Tiny"), 8, 8, torch.bfloat16,
                          torch.device("cuda"), "int4")

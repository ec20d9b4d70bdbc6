"""speedups/, the fast path both scripts apply: what it swaps in, what SPEEDUPS=0 leaves alone, and that the
text and the logits do not change (float32, against llama-models as written and a cache-free recomputation)."""

import fairscale.nn.model_parallel.layers as fairscale_layers
import pytest
import torch
from llama_models.llama3 import model as llama_model

import minimal_run_inference
import run_inference
import speedups
from speedups import calibration, layouts, native
from conftest import CPU, FIXED_KERNELS, SCRIPTS, greedy_without_cache, load, reference_model, run_script
from standin.random_checkpoint import TINY, ffn_hidden_dim
from test_independent import random_prompt

FAIRSCALE_LINEAR = (fairscale_layers.ColumnParallelLinear, fairscale_layers.RowParallelLinear)


def no_patched_forwards(model):
    """No module's forward is replaced on the instance, and no hooks run around any module."""
    return all("forward" not in vars(module) and not module._forward_pre_hooks and not module._forward_hooks
               for module in model.modules())


def test_speedups_off_runs_llama_models_as_written(script, models_dir, distributed):
    model = load(script, models_dir / "Tiny", 20, batch=3, use_speedups=False)
    assert type(model) is llama_model.Transformer
    for layer in model.layers:
        assert type(layer.attention) is llama_model.Attention
        assert type(layer.feed_forward) is llama_model.FeedForward
        assert layer.attention.cache_k.shape == (3, 20, 2, 16)  # llama-models' layout, sized to this job
    linears = [m for m in model.modules() if isinstance(m, FAIRSCALE_LINEAR)]
    assert len(linears) == 7 * 2 + 1 and type(model.output) is fairscale_layers.ColumnParallelLinear
    assert not any(isinstance(m, (layouts.FastLinear, speedups.GroupedQueryAttention)) for m in model.modules())
    assert no_patched_forwards(model)


@pytest.mark.parametrize("batch, linear", [(1, layouts.PlainLinear), (4, layouts.PackedLinear)])
def test_speedups_swap_named_modules(script, batch, linear, models_dir, distributed):
    if linear is layouts.PackedLinear and not calibration.packs_weights(CPU, torch.float32, batch):
        linear = layouts.PlainLinear  # no oneDNN kernels to pack for on this CPU
    model = load(script, models_dir / "Tiny", 20, batch=batch)
    for layer in model.layers:
        assert type(layer.attention) is speedups.GroupedQueryAttention
        assert layer.attention.cache_k.shape == (batch, 2, 20, 16)  # (batch, kv_heads, seq, head_dim): this job's
        assert layer.attention.cache_v.dtype == torch.float32 and not layer.attention.cache_v.is_meta
        assert type(layer.feed_forward) is speedups.FusedFeedForward
        assert layer.attention.wqkv.shape == (64 + 2 * 32, 64) and layer.feed_forward.w13.shape == (2 * ffn_hidden_dim(TINY), 64)
    assert type(model.output) is speedups.LastPositionLogits and type(model.output.layer) is linear
    assert sum(type(m) is linear for m in model.modules()) == 4 * 2 + 1  # wqkv, wo, w13, w2 per layer; output
    assert not any(isinstance(m, FAIRSCALE_LINEAR) for m in model.modules())
    assert no_patched_forwards(model)
    assert f"{linear.__name__}(in=64, out=64, kernels=(" in repr(model) and "GroupedQueryAttention(" in repr(model)


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_speedups_on_and_off_print_the_cache_free_greedy_text(script_name, models_dir, tokenizer, distributed):
    prompt = "Once upon a time"
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    expected = greedy_without_cache(reference_model(models_dir / "Tiny", len(prompt_ids) + 20), prompt_ids, 20,
                                    tokenizer.stop_tokens)
    for speedups_on in (0, 1):
        result = run_script(script_name, models_dir, "Tiny", INPUT_STRING=prompt, DTYPE="float32", MAX_NEW_TOKENS=20,
                            SPEEDUPS=speedups_on)
        assert result.returncode == 0, result.stderr
        assert result.stdout == tokenizer.decode(expected)


@pytest.mark.parametrize("chunk", [7, 256])
@pytest.mark.parametrize("use_speedups, kernels", [(False, FIXED_KERNELS), (True, FIXED_KERNELS), (True, "linear")],
                         ids=["speedups-off", "speedups-on", "speedups-on-one-call"])
def test_prefill_in_chunks_gives_the_cache_free_logits_and_tokens(script, use_speedups, kernels, chunk, models_dir,
                                                                  tokenizer, distributed, monkeypatch):
    """A prompt longer than the chunk (300 tokens) is fed chunk by chunk, each at its own position: the last
    position's logits are those of one pass over the whole prompt, and so is every greedy token after it. With
    our C++ built and a kernel named (not the rule), the norms and RoPE are decoding.cpp's single calls."""
    monkeypatch.setattr(script, "PREFILL_CHUNK", chunk)
    ids = random_prompt(tokenizer, 300, seed=5)
    reference = reference_model(models_dir / "Tiny", len(ids) + 12)
    model = load(script, models_dir / "Tiny", len(ids) + 12, use_speedups=use_speedups, kernels=kernels)
    if kernels != FIXED_KERNELS:
        one_call(model)
    expected = reference(torch.tensor([ids]), start_pos=0)[0, -1]
    assert (script.prefill(model, ids) - expected).abs().max() < 1e-4
    model = load(script, models_dir / "Tiny", len(ids) + 12, use_speedups=use_speedups, kernels=kernels)  # empty cache
    assert list(script.generate(model, ids, 12, tokenizer.stop_tokens)) == \
        greedy_without_cache(reference, ids, 12, tokenizer.stop_tokens)


def one_call(model):
    """Skips where our C++ is not built; else checks that every norm and attention layer uses it."""
    if native.library() is None:
        pytest.skip(f"our C++: not available ({native.why_unavailable()})")
    norms = [model.norm, *(norm for layer in model.layers for norm in (layer.attention_norm, layer.ffn_norm))]
    assert all(type(norm) is speedups.OneCallRMSNorm for norm in norms)
    assert all(layer.attention.one_call_rope for layer in model.layers)


def test_prefill_continues_after_what_the_cache_holds(script, models_dir, tokenizer, distributed):
    """prefill(start_pos=n) feeds a text after the n tokens already cached (a chat's next turn)."""
    ids = random_prompt(tokenizer, 50, seed=6)
    model = load(script, models_dir / "Tiny", len(ids))
    script.prefill(model, ids[:20])
    expected = reference_model(models_dir / "Tiny", len(ids))(torch.tensor([ids]), start_pos=0)[0, -1]
    assert (script.prefill(model, ids[20:], start_pos=20) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("use_speedups", [False, True], ids=["speedups-off", "speedups-on"])
def test_tied_weights_stay_one_tensor_when_the_model_is_converted(use_speedups, tmp_path, distributed):
    """Llama 3.2 stores its output layer and embedding table once; a float32 load copies every weight, and
    must copy that one once, for both scripts (support.checkpoint.tie_weights)."""
    from standin.random_checkpoint import TINY, random_weights, write_checkpoint
    folder = write_checkpoint(tmp_path / "Tied", TINY, random_weights(TINY, tie_embeddings=True))
    for script in (minimal_run_inference, run_inference):
        model = load(script, folder, 8, torch.float32, use_speedups=use_speedups)
        output = model.output.layer if use_speedups else model.output
        assert output.weight.dtype == torch.float32
        assert output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_a_float32_load_of_tied_1b_weights_holds_the_table_once(llama_1b_dir):
    """The peak memory of a float32 run of the 1B shapes: the float32 weights (tied table once) plus the
    memory-mapped bfloat16 file they are converted from; a second float32 copy of the 128,256 x 2,048
    table would add 0.98 GiB."""
    result = run_script("minimal_run_inference.py", llama_1b_dir, "Llama3.2-1B", DTYPE="float32", MAX_NEW_TOKENS=2)
    assert result.returncode == 0, result.stderr
    peak_gib = float(result.stderr.split("peak memory ")[1].split()[0])
    file_gib = (llama_1b_dir / "Llama3.2-1B" / "consolidated.00.pth").stat().st_size / 2**30
    assert peak_gib < 3 * file_gib + 0.5  # float32 weights (twice the file) + the file


def test_every_weight_is_the_files_in_2_mib_pages(llama_1b_dir, distributed):
    """wq|wk|wv and w1|w3, which speedups builds, and the file's weights that stay as they are (wo, w2, the
    output table), copied out of the memory-mapped file, all sit in memory asked for 2 MiB pages
    (layouts.weight_memory) and hold the file's weights; the tied table stays one tensor; the fast-path line
    says how many bytes of the weights Linux backs with such pages."""
    folder = llama_1b_dir / "Llama3.2-1B"
    model = load(minimal_run_inference, folder, 8, torch.bfloat16)
    file = torch.load(folder / "consolidated.00.pth", mmap=True, weights_only=True)
    for i, layer in enumerate(model.layers):
        name = f"layers.{i}.attention.w{{}}.weight".format
        assert torch.equal(layer.attention.wqkv.weight, torch.cat([file[name(x)] for x in "qkv"]))
        name = f"layers.{i}.feed_forward.w{{}}.weight".format
        assert torch.equal(layer.feed_forward.w13.weight, torch.cat([file[name(1)], file[name(3)]]))
        assert torch.equal(layer.attention.wo.weight, file[f"layers.{i}.attention.wo.weight"])
        assert torch.equal(layer.feed_forward.w2.weight, file[f"layers.{i}.feed_forward.w2.weight"])
    assert model.output.layer.weight is model.tok_embeddings.weight
    assert torch.equal(model.output.layer.weight, file["output.weight"])
    if not layouts.huge_pages_available():
        pytest.skip(f"no transparent huge pages here ({layouts.transparent_huge_pages()}): 4 KiB pages only")
    everything, in_huge_pages = layouts.weights_in_huge_pages(
        m for m in model.modules() if isinstance(m, layouts.FastLinear))
    assert in_huge_pages >= 0.9 * everything  # Linux may fall back to small pages where it finds no free 2 MiB
    assert everything == sum(t.nbytes for name, t in file.items() if t.dim() == 2 and name != "tok_embeddings.weight")
    clause = f"{in_huge_pages / 1e9:.2f} of {everything / 1e9:.2f} GB of weights in 2 MiB pages"
    assert clause in speedups.describe(model)


def test_one_row_uses_pytorchs_own_kernel_and_restores_onednn(models_dir, distributed):
    """The fixed rule's PlainLinear switches oneDNN off for single-row products only, and back on afterwards."""
    layer = load(run_inference, models_dir / "Tiny", 8, torch.bfloat16).layers[0].feed_forward.w13
    x = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    seen = []
    original = torch.nn.functional.linear

    def spy(*args):
        seen.append(torch.backends.mkldnn.enabled)
        return original(*args)

    torch.nn.functional.linear = spy
    try:
        one_row, five_rows = layer(x[:1]), layer(x)
    finally:
        torch.nn.functional.linear = original
    assert seen == [False, True] and torch.backends.mkldnn.enabled
    expected = x.float() @ layer.weight.float().T
    assert (five_rows.float() - expected).abs().max() < 0.05 and (one_row.float() - expected[:1]).abs().max() < 0.05

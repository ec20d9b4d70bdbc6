"""The closing report: tokens/s and the bandwidth they mean. A decode step reads every weight once, so the
bytes of weights a step reads, times decode tokens/s, is the memory bandwidth the decoding achieved."""

import re

import pytest
import torch

from conftest import SCRIPTS, load, run_script
from standin.random_checkpoint import TINY, ffn_hidden_dim, random_weights, write_checkpoint
from support import report


def bytes_read_by_hand(params, tied, element_size):
    """Every linear weight and norm once, the output layer whole, one row of the embedding table; a tied
    output layer is the table itself, read whole, once."""
    dim, hidden = params["dim"], ffn_hidden_dim(params)
    kv_dim = params["n_kv_heads"] * dim // params["n_heads"]
    layer = 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim + 2 * dim  # wq wo, wk wv, w1 w2 w3, two norms
    output = params["vocab_size"] * dim
    embedding_row = 0 if tied else dim
    return (params["n_layers"] * layer + dim + output + embedding_row) * element_size


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("use_speedups", [False, True], ids=["speedups-off", "speedups-on"])
def test_weight_bytes_per_step(script, tmp_path, distributed, tied, use_speedups):
    write_checkpoint(tmp_path / "Tiny", TINY, random_weights(TINY, tie_embeddings=tied))
    model = load(script, tmp_path / "Tiny", 8, torch.float32, use_speedups=use_speedups)
    output = model.output.layer if use_speedups else model.output
    still_tied = output.weight is model.tok_embeddings.weight  # not when speedups chose to pack the output layer
    assert report.weight_bytes_per_step(model) == bytes_read_by_hand(TINY, tied and still_tied, 4)


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_the_report_states_the_bandwidth_of_the_decoding(script_name, models_dir):
    result = run_script(script_name, models_dir, "Tiny", MAX_NEW_TOKENS=8, SHOW_TOKENS=0, LOOK_INSIDE=0)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if " new tokens in " in line)
    match = re.search(r"then ([\d.]+) tokens/s x ([\d.]+) GB of weights a step = ([\d.]+) GB/s; weights only", line)
    assert match, line
    tokens_per_s, gigabytes, bandwidth = map(float, match.groups())
    assert gigabytes == float(f"{bytes_read_by_hand(TINY, False, 2) / 1e9:.3g}")  # bfloat16: 2 bytes a weight
    assert bandwidth == pytest.approx(tokens_per_s * gigabytes, rel=0.01, abs=0.01)

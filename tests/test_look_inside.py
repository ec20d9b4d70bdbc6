"""The tutorial's look inside (run_inference.look_inside, the table it prints and the picture it draws), checked
by its numbers.

Everything shown comes from one pass, look_inside, over the prompt's positions. It is compared with
transformers' own Llama on the same weights (hf_reference.lens_and_attention: transformers' hidden states
through its norm and lm_head, and its attention weights): at every position, on the tiny random model (both
cache layouts, in chunks that read the earlier ones from the cache) and on SmolLM2's trained weights
(standin/smollm.py). Then what a user sees: every column of the printed table, parsed from a run of the script;
the picture's cells and heat maps; the PNG file and its stated size; the memory a 4,096-token prompt takes;
and one clear line for each wrong setting.
"""

import ast
import os
import re
import struct
import subprocess
import sys
import tempfile

import pytest
import torch
from llama_models.llama3.tokenizer import Tokenizer
from PIL import Image

import run_inference
import smollm_witness
from conftest import REPO, clean_environment, load, run_script
from hf_reference import lens_and_attention, transformers_llama
from standin import smollm
from standin.random_checkpoint import TINY
from support import picture

ONE_WORKER_FIXTURES = ["story"]  # its tests on one xdist worker (conftest): computed once (15 s)

TOP = run_inference.LOOK_INSIDE_TOP
STORY = "The Eiffel Tower is in the city of"  # README's picture: SmolLM2 knows the answer, " Paris"
TINY_TEXT = "The capital of France is Paris, and the capital of Italy is"
FP32_GAP = 1e-5  # float32, the tiny model: |ours - transformers'| at most this
REAL_GAP = 1e-4  # float32, SmolLM2's 30 layers
PRINTED_GAP = 0.005 + REAL_GAP  # the table prints 2 decimals
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_LIMIT = 200_000  # bytes: README's picture must stay small
LONG_PROMPT = 4096  # tokens
# A 4,096-token prompt must not take (layers x positions x vocab) float32 numbers at once: 4.2 GB for the tiny
# model. The look inside may add at most a quarter of that to the run's peak memory.
FULL_LENS_BYTES = TINY["n_layers"] * LONG_PROMPT * TINY["vocab_size"] * 4
MEMORY_BOUND = FULL_LENS_BYTES // 4


def assert_top_tokens(probs, token_ids, reference, gap):
    """probs and token_ids (..., k) are the k most likely tokens of the distributions `reference` (..., vocab),
    best first: each probability is the reference's for that token, and no other token has more than the k-th."""
    assert (reference.gather(-1, token_ids) - probs).abs().max() <= gap
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    others = reference.scatter(-1, token_ids, 0.0)
    assert (others.max(dim=-1).values <= probs[..., -1] + gap).all()


# ---------------------------------------------------------------------------------------------------------
# The numbers: look_inside against transformers at every position
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk, first", [(256, 0), (4, 5)], ids=["one-chunk", "chunks-of-4-from-position-5"])
@pytest.mark.parametrize("use_speedups", [True, False], ids=["speedups-on", "speedups-off"])
def test_look_inside_is_transformers_at_every_position(use_speedups, chunk, first, models_dir, tokenizer,
                                                       distributed, monkeypatch):
    monkeypatch.setattr(run_inference, "PREFILL_CHUNK", chunk)
    ids = tokenizer.encode(TINY_TEXT, bos=True, eos=False)
    model = load(run_inference, models_dir / "Tiny", len(ids) + 1, use_speedups=use_speedups)
    logits = run_inference.prefill(model, ids)
    layer = 1  # the tiny model's first of two layers: the last one is the default
    look = run_inference.look_inside(model, ids, layer, first)
    hf_lens, hf_attention = lens_and_attention(transformers_llama(models_dir / "Tiny"), ids)
    assert look.probs.shape == look.token_ids.shape == (TINY["n_layers"], len(ids) - first, TOP)
    assert_top_tokens(look.probs, look.token_ids, hf_lens[:, first:], FP32_GAP)
    assert (look.head_maps - hf_attention[layer - 1, :, first:]).abs().max() <= FP32_GAP
    assert (look.last_attention - hf_attention[:, :, -1]).abs().max() <= FP32_GAP
    # the last layer's lens at the last position is the model's own next-token distribution
    assert_top_tokens(look.probs[-1, -1], look.token_ids[-1, -1], torch.softmax(logits.float(), dim=-1), FP32_GAP)


@pytest.fixture(scope="module")
def story(smollm_dir):
    """SmolLM2 on the story prompt: (model folder, tokenizer, ids, transformers' lens (layers, positions, our
    vocabulary) and attention (layers, heads, positions, positions))."""
    vocab = smollm.vocabulary(smollm_dir)
    model_dir = smollm_dir / smollm.BASE_MODEL
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    ids = tokenizer.encode(STORY, bos=True, eos=False)
    with smollm_witness.one_thread():
        lens, attention = lens_and_attention(smollm_witness.transformers_smollm(), vocab.to_smollm(ids))
    # transformers has SmolLM2's 49,152 tokens; ours are them, renumbered where special, plus rows that hold no
    # probability after any layer (standin/smollm.py: the away row)
    ours = torch.zeros(*lens.shape[:-1], smollm.LLAMA_3_VOCAB_SIZE)
    ours[..., vocab.from_smollm(list(range(vocab.smollm_size)))] = lens
    return model_dir, tokenizer, ids, ours, attention


def test_look_inside_real_weights_is_transformers_at_every_position(story, distributed, monkeypatch):
    """On SmolLM2's trained weights, in chunks of 4 positions: every position's lens after every layer, the
    default layer's heads and every layer's last row equal transformers'; the answer forms in the last layers."""
    model_dir, tokenizer, ids, hf_lens, hf_attention = story
    monkeypatch.setattr(run_inference, "PREFILL_CHUNK", 4)
    model = load(run_inference, model_dir, len(ids) + 1)
    run_inference.prefill(model, ids)
    layer = run_inference.shown_layer(len(model.layers))
    look = run_inference.look_inside(model, ids, layer)
    assert_top_tokens(look.probs, look.token_ids, hf_lens, REAL_GAP)
    assert (look.head_maps - hf_attention[layer - 1]).abs().max() <= REAL_GAP
    assert (look.last_attention - hf_attention[:, :, -1]).abs().max() <= REAL_GAP
    [paris] = tokenizer.encode(" Paris", bos=False, eos=False)
    assert int(look.token_ids[-1, -1, 0]) == paris


# ---------------------------------------------------------------------------------------------------------
# What a user sees: the table, column by column
# ---------------------------------------------------------------------------------------------------------
SHOWN = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*") (\d+\.\d\d)"""  # a token's repr and a number with 2 decimals


def printed_table(stderr):
    """The look inside's table: (the last token's text, the number of heads in the header, rows as (layer
    number, [(token text, probability)] * TOP of the lens, [(token text, weight)] * TOP of attention))."""
    after = stderr.split("look inside, at the prompt's last token ", 1)[1]
    title, header, *lines = after.splitlines()
    rows = []
    for line in lines:
        if not re.match(r"\s*\d+  \S", line):
            break
        pairs = [(ast.literal_eval(text), float(number)) for text, number in re.findall(SHOWN, line)]
        rows.append((int(line.split()[0]), pairs[:TOP], pairs[TOP:]))
    heads = int(re.search(r"mean of (\d+) heads", header).group(1))
    return ast.literal_eval(title.removesuffix(":")), heads, rows


def top_shown(values, texts):
    """The TOP largest of `values` (n,) as (text, value) pairs, best first, with their texts; the values
    around the last one shown must be apart by more than a rounding, or a printed order could differ."""
    ordered, order = values.sort(descending=True)
    assert (ordered[: TOP] - ordered[1 : TOP + 1]).min() > 2 * REAL_GAP, "near tie: choose another prompt"
    return [(texts(int(i)), float(v)) for v, i in zip(ordered[:TOP], order[:TOP])]


def assert_pairs(printed, expected):
    assert [text for text, _ in printed] == [text for text, _ in expected]
    assert max(abs(p - e) for (_, p), (_, e) in zip(printed, expected)) <= PRINTED_GAP


def png_size(path):
    """A PNG file's width and height, read from its header (IHDR), after Pillow has decoded the whole image."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    with Image.open(path) as image:
        image.load()
        assert image.size == struct.unpack(">II", data[16:24])
    return image.size


def test_every_column_of_the_table_and_the_picture_file(story, tmp_path):
    """Run the script on SmolLM2 in float32 with the picture on: each layer's row shows transformers' top
    tokens after that layer and their probabilities, and the prompt tokens its heads read most on average
    with their mean weights; the PNG file is what the script says it wrote."""
    model_dir, tokenizer, ids, hf_lens, hf_attention = story
    picture = tmp_path / "look.png"
    result = run_script("run_inference.py", model_dir.parent, smollm.BASE_MODEL, INPUT_STRING=STORY,
                        DTYPE="float32", MAX_NEW_TOKENS=1, SHOW_TOKENS=0, LOOK_INSIDE_PNG=picture)
    assert result.returncode == 0, result.stderr
    last, heads, rows = printed_table(result.stderr)
    assert last == tokenizer.decode(ids[-1:]) and heads == hf_attention.shape[1]
    assert [number for number, _, _ in rows] == list(range(1, len(hf_lens) + 1))
    mean_attention = hf_attention[:, :, -1].mean(dim=1)  # (layers, positions): the heads' mean at the last token
    for (_, lens, attention), hf_layer_lens, hf_layer_attention in zip(rows, hf_lens[:, -1], mean_attention):
        assert_pairs(lens, top_shown(hf_layer_lens, lambda i: tokenizer.decode([i])))
        assert_pairs(attention, top_shown(hf_layer_attention, lambda i: tokenizer.decode([ids[i]])))
    [said] = re.findall(r"picture is in (.+) \((\d+) x (\d+) pixels, (\d+) KB\)", result.stderr)
    assert said[0] == str(picture) and png_size(picture) == (int(said[1]), int(said[2]))
    assert int(said[3]) == round(picture.stat().st_size / 1000) and picture.stat().st_size < PNG_LIMIT


# ---------------------------------------------------------------------------------------------------------
# What a user sees: the picture
# ---------------------------------------------------------------------------------------------------------
def drawn(model, tokenizer, ids, path, monkeypatch, capsys):
    """show_look_inside as main calls it, with LOOK_INSIDE_PNG=path: (the figure it drew, what it printed)."""
    figures = []
    draw = picture.draw_look_inside
    monkeypatch.setattr(run_inference, "LOOK_INSIDE_PNG", str(path))
    monkeypatch.setattr(picture, "draw_look_inside", lambda *args: figures.append(draw(*args)) or figures[-1])
    capsys.readouterr()
    run_inference.show_look_inside(model, tokenizer, ids)
    [figure] = figures
    return figure, capsys.readouterr().err


def panels(figure):
    """The picture's two panels: (the lens grid's axes, the heat maps' axes with an image, the heads' title)."""
    lens_part, heads_part = figure.subfigs
    [lens_axes] = [axes for axes in lens_part.axes if axes.images and axes.texts]
    maps = [axes for axes in heads_part.axes if axes.images and axes.get_title().startswith("head ")]
    return lens_axes, maps, heads_part.get_suptitle()


def numbers(axes):
    """The numbers an axes' image shows, (rows, columns)."""
    return torch.as_tensor(axes.images[0].get_array().data)


def test_the_picture_shows_the_tables_numbers_and_transformers(story, distributed, tmp_path, monkeypatch, capsys):
    """On SmolLM2 in float32: the grid's cells are transformers' top token and its probability, layers by
    positions; its last column is the table's; each heat map is transformers' attention of that head in the
    layer the title names."""
    model_dir, tokenizer, ids, hf_lens, hf_attention = story
    model = load(run_inference, model_dir, len(ids) + 1)
    run_inference.prefill(model, ids)
    figure, printed = drawn(model, tokenizer, ids, tmp_path / "look.png", monkeypatch, capsys)
    lens_axes, maps, title = panels(figure)
    cells = numbers(lens_axes)  # (layers, positions)
    top_probs, top_ids = hf_lens.max(dim=-1)
    assert (cells - top_probs).abs().max() <= REAL_GAP
    texts = [[picture.token_label(tokenizer.decode([i])) for i in layer] for layer in top_ids.tolist()]
    at = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text() for text in lens_axes.texts}
    assert at == {(layer, position): text for layer, row in enumerate(texts) for position, text in enumerate(row)}
    _, _, rows = printed_table(printed)
    assert [picture.token_label(lens[0][0]) for _, lens, _ in rows] == [layer[-1] for layer in texts]
    assert all(abs(lens[0][1] - cell) <= PRINTED_GAP for (_, lens, _), cell in zip(rows, cells[:, -1]))
    layer = int(re.search(r"layer (\d+)", title).group(1))
    assert layer == run_inference.shown_layer(len(hf_lens)) and len(maps) == hf_attention.shape[1]
    for head, axes in enumerate(maps):
        assert axes.get_title() == f"head {head + 1}"
        assert (numbers(axes) - hf_attention[layer - 1, head]).abs().max() <= REAL_GAP


def test_a_long_prompts_picture_shows_its_last_positions_and_where_the_rest_went(models_dir, tokenizer, distributed,
                                                                                tmp_path, monkeypatch, capsys):
    """A prompt longer than the picture: the grid shows its last LOOK_INSIDE_POSITIONS positions, and says so;
    the heat maps' rows are those positions, their columns position 0, then the positions between summed,
    then the picture's: transformers' weights, every row summing to 1."""
    shown = run_inference.LOOK_INSIDE_POSITIONS
    ids = tokenizer.encode(" ".join([TINY_TEXT] * 4), bos=True, eos=False)
    first = len(ids) - shown
    assert first > 1
    model = load(run_inference, models_dir / "Tiny", len(ids) + 1)
    run_inference.prefill(model, ids)
    figure, _ = drawn(model, tokenizer, ids, tmp_path / "look.png", monkeypatch, capsys)
    lens_axes, maps, title = panels(figure)
    hf_lens, hf_attention = lens_and_attention(transformers_llama(models_dir / "Tiny"), ids)
    assert (numbers(lens_axes) - hf_lens[:, first:].amax(dim=-1)).abs().max() <= FP32_GAP
    assert f"the last {shown} of {len(ids)} positions" in lens_axes.get_xlabel()
    layer = int(re.search(r"layer (\d+)", title).group(1))
    rows = hf_attention[layer - 1, :, first:]  # (heads, shown, positions)
    expected = torch.cat([rows[..., :1], rows[..., 1:first].sum(dim=-1, keepdim=True), rows[..., first:]], dim=-1)
    for head, axes in enumerate(maps):
        image = numbers(axes)
        assert (image - expected[head]).abs().max() <= FP32_GAP
        assert (image.sum(dim=-1) - 1).abs().max() <= FP32_GAP


# ---------------------------------------------------------------------------------------------------------
# Memory with a long prompt
# ---------------------------------------------------------------------------------------------------------
def long_prompt_file(tokenizer, folder):
    """A UTF-8 file of English whose prompt is LONG_PROMPT tokens or a few more."""
    text = smollm_witness.english_text()
    words = (text + " ") * (LONG_PROMPT // len(tokenizer.encode(text, bos=False, eos=False)) + 1)
    path = folder / "long.txt"
    path.write_text(words, encoding="utf-8")
    return path


def peak_memory(command, env):
    """Run a command to its end; its peak resident memory in bytes (Linux counts ru_maxrss in KiB)."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        stderr.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, stderr.read().decode()
    return usage.ru_maxrss * 1024


def test_a_long_prompts_look_inside_stays_within_a_memory_bound(models_dir, tokenizer, tmp_path):
    """The script on a 4,096-token INPUT_FILE: the look inside and its picture add less than a quarter of what
    the lens of every layer and position at once would take."""
    settings = dict(LLAMA_MODELS_DIR=models_dir, MODEL_NAME="Tiny", DEVICE="cpu", MAX_NEW_TOKENS=1, SHOW_TOKENS=0,
                    INPUT_FILE=long_prompt_file(tokenizer, tmp_path))
    script = [sys.executable, str(REPO / "run_inference.py")]
    without = peak_memory(script, clean_environment(**settings, LOOK_INSIDE=0))
    with_picture = peak_memory(script, clean_environment(**settings, LOOK_INSIDE_PNG=tmp_path / "look.png"))
    assert png_size(tmp_path / "look.png")
    assert with_picture - without < MEMORY_BOUND, f"{(with_picture - without) / 2**20:.0f} MiB more"


EVERY_POSITION = """
import resource, sys
from pathlib import Path

import torch

import run_inference
from conftest import load
from support import devices
devices.init_distributed(torch.device("cpu"))
ids = [int(i) for i in open(sys.argv[2]).read().split()]
model = load(run_inference, Path(sys.argv[1]), len(ids))
run_inference.prefill(model, ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
look = run_inference.look_inside(model, ids, 1, first=0)
assert look.probs.shape[1] == len(ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_the_lens_of_every_position_of_a_long_prompt_stays_within_a_memory_bound(models_dir, tokenizer, tmp_path):
    """look_inside at all 4,096 positions (one layer's heat maps included: heads x 4,096 x 4,096 numbers) raises
    the process's peak memory by less than a quarter of the lens of every layer and position at once."""
    ids = tokenizer.encode(long_prompt_file(tokenizer, tmp_path).read_text(), bos=True, eos=False)[:LONG_PROMPT]
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    env = clean_environment(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    result = subprocess.run([sys.executable, "-c", EVERY_POSITION, str(models_dir / "Tiny"), str(tmp_path / "ids.txt")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    added = int(result.stdout.split()[-1]) * 1024  # ru_maxrss: KiB
    assert added < MEMORY_BOUND, f"{added / 2**20:.0f} MiB more"


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, says", [
    (dict(LOOK_INSIDE_LAYER=3), "LOOK_INSIDE_LAYER=3 is out of range: it must be at least 0 and at most 2"),
    (dict(LOOK_INSIDE_LAYER=-1), "LOOK_INSIDE_LAYER=-1 is out of range"),
    (dict(LOOK_INSIDE_PNG="{tmp}/no-such-folder/look.png"), "in a folder you can write to"),
    (dict(LOOK_INSIDE_PNG="{tmp}/look.jpg"), "give a .png file name"),
    (dict(LOOK_INSIDE_PNG="{tmp}"), "give a .png file name"),
    (dict(LOOK_INSIDE_PNG="{tmp}/look.png", LOOK_INSIDE=0), "needs LOOK_INSIDE=1"),
    (dict(LOOK_INSIDE_PNG="{tmp}/look.png", CHAT=1, MODEL_NAME="Tiny-Instruct"), "no CHAT"),
    (dict(LOOK_INSIDE_PNG="{tmp}/look.png", PYTHONPATH="{tmp}/without-matplotlib"),
     "LOOK_INSIDE_PNG needs matplotlib, which is not installed: pip install -r requirements.txt"),
], ids=["layer-too-high", "layer-negative", "no-folder", "not-png", "a-folder", "look-inside-off", "chat",
        "no-matplotlib"])
def test_a_wrong_look_inside_setting_is_one_line_before_loading(settings, says, models_dir, tmp_path):
    hidden = tmp_path / "without-matplotlib" / "matplotlib"  # shadows the installed one: importing it fails
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    settings = {name: str(value).format(tmp=tmp_path) for name, value in settings.items()}
    result = run_script("run_inference.py", models_dir, settings.pop("MODEL_NAME", "Tiny"), stdin="", **settings)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()  # nothing else: the model was not loaded
    assert line.startswith("error: ") and says in line
    assert not list(tmp_path.glob("**/*.png")) and not (tmp_path / "look.jpg").exists()

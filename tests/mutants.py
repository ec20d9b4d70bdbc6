"""Plant one-line bugs, one at a time, in a copy of the project, and run the tests that should catch each.

    python tests/mutants.py                          # every mutant, after the tests pass on an unchanged copy
    python tests/mutants.py --only rope-factor-8-tutorial,top-p-mask-removed --no-baseline
    python tests/mutants.py --list

A developer's tool, not part of the test suite: a mutant whose tests still pass "survived", which means the
tests cannot tell that bug from the real code. Each mutant names a file, a line fragment that occurs in it
exactly once, what replaces it, and the few tests that should fail (pytest arguments, run with -x). The
copy holds the files git tracks or would track; the real tree is never touched. Takes about 10 minutes on
2 cores; the same tests must pass on the unchanged copy first, or every mutant would look caught.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MINIMAL, TUTORIAL, SPEEDUPS = "minimal_run_inference.py", "run_inference.py", "speedups/__init__.py"
LAYOUTS, KERNELS, CALIBRATION = "speedups/layouts.py", "speedups/kernels.py", "speedups/calibration.py"
CHECKPOINT, DEVICES, EXITS = "support/checkpoint.py", "support/devices.py", "support/exits.py"
SETTINGS, REPORT, STANDIN, README = "support/settings.py", "support/report.py", "standin/smollm.py", "README.md"
PICTURE = "support/picture.py"
NATIVE = "speedups/quantized.cpp"  # each mutant of it compiles its own copy (a minute) into the user's cache
DECODING = "speedups/decoding.cpp"  # the same
# Tests, by what they check: pytest node ids ([...] picks parameters) or a file and a -k expression.
SPEEDUPS_TESTS = "tests/test_speedups.py::"
CHUNKED = SPEEDUPS_TESTS + "test_prefill_in_chunks_gives_the_cache_free_logits_and_tokens"
PREFILL = {script: [f"{CHUNKED}[{script}-speedups-on-7]", f"{CHUNKED}[{script}-speedups-off-7]",
                    f"{SPEEDUPS_TESTS}test_prefill_continues_after_what_the_cache_holds[{script}]"]
           for script in ("minimal", "tutorial")}
STOPS = ["tests/test_scripts.py", "-k", "each_stop_token"]
BEAMS = ["tests/test_generation.py::test_beam_search_keeps_the_k_best_sequences_at_every_step",
         "tests/test_generation.py::test_beam_score_is_the_sum_of_token_log_probs"]
ROPE_TABLES = ["tests/test_independent.py::test_rope_table_uses_the_published_factor"]
ROPE_1B = "tests/test_independent.py::test_llama_3_2_1b_matches_factor_32"  # [minimal] or [tutorial]
LOGITS = ["tests/test_independent.py::test_logits_through_the_kv_cache_match_transformers"]
QUANTIZED = ["tests/test_quantize.py", "-k", "by_hand or both_sides or close_to_bfloat16"]
UNBUILDABLE = ["tests/test_kernels.py", "-k", "cannot_be_built"]
WRONG = ["tests/test_kernels.py", "-k", "wrong_kernel_is_never_chosen or forced_kernel_that_fails"]
SAMPLING = ["tests/test_generation.py::test_the_script_samples_from_the_nucleus_at_its_temperature"]
CHAT = ["tests/test_chat.py::test_each_reply_is_a_fresh_runs_and_each_turn_feeds_only_its_new_tokens"]
PLATFORM = ["tests/test_platform.py"]
LAYER = ["tests/test_layer.py", "-k", "float32"]
# Real trained weights (SmolLM2-135M, RoPE theta 100,000): every random checkpoint has Llama 3's theta, 500,000.
REAL_NLL = "tests/test_real_weights.py::test_english_is_predictable_in_float32"  # [minimal] or [tutorial]
LOOK = "tests/test_look_inside.py::"
LOOK_NUMBERS = [LOOK + "test_look_inside_is_transformers_at_every_position"]
LOOK_CHUNKS = [LOOK_NUMBERS[0] + "[speedups-on-chunks-of-4-from-position-5]"]
LOOK_TABLE = [LOOK + "test_every_column_of_the_table_and_the_picture_file"]
LOOK_PICTURE = [LOOK + "test_the_picture_shows_the_tables_numbers_and_transformers"]
LOOK_LONG_PICTURE = [LOOK + "test_a_long_prompts_picture_shows_its_last_positions_and_where_the_rest_went"]
LOOK_MEMORY = [LOOK + "test_the_lens_of_every_position_of_a_long_prompt_stays_within_a_memory_bound"]
HUGE_PAGES = SPEEDUPS_TESTS + "test_every_weight_is_the_files_in_2_mib_pages"
NATIVE_TESTS = "tests/test_native_kernels.py"
AVX2_INT8 = [NATIVE_TESTS, "-k", "int8_product and avx2"]
STEP_THREADS = ["tests/test_kernels.py", "-k", "step_threads"]
MODULES = [SPEEDUPS_TESTS + "test_speedups_off_runs_llama_models_as_written",
           SPEEDUPS_TESTS + "test_speedups_swap_named_modules"]
# First contact: bad input (support/), the stand-in's folder, README's commands.
BAD_INPUT = {name: ["tests/test_bad_input.py", "-k", name] for name in (
    "sizes_are_not_a_llamas", "job_fields", "floating_point", "weights_file_that_is_not_a_file", "never_read",
    "context_can_hold", "stdin", "out_of_range", "folder_and_its_name", "ctrl_c_during")}
README_TESTS = {name: ["tests/test_readme.py", "-k", name] for name in (
    "every_command", "error_lines", "what_ci_runs", "python_floor", "process_counts", "run_command")}
SPECULATIVE = "tests/test_speculative.py::"
SPECULATIVE_GREEDY = [SPECULATIVE + "test_greedy_with_any_proposer_is_plain_greedy"]
SPECULATIVE_SAMPLING = [SPECULATIVE + "test_sampling_with_drafts_draws_from_the_model"]

# name: (file, the line fragment, its replacement, the tests that must catch it)
MUTANTS = {
    "decode-position-off-by-one-minimal": (MINIMAL, "start_pos + len(prompt_ids) + step)[0]",
                                           "start_pos + len(prompt_ids) + step + 1)[0]", PREFILL["minimal"][:1]),
    "decode-position-off-by-one-tutorial": (TUTORIAL, "start_pos + len(prompt_ids) + step)[0]",
                                            "start_pos + len(prompt_ids) + step + 1)[0]", PREFILL["tutorial"][:1]),
    "stop-token-ignored": (MINIMAL, "if token_id in stop_tokens:", "if token_id in stop_tokens and False:", STOPS),
    "stop-token-printed": (TUTORIAL, "        if token_id in stop_tokens:\n            return",
                           "        if token_id in stop_tokens:\n            yield token_id\n            return",
                           STOPS),
    "beam-cache-not-reordered": (TUTORIAL, "        reorder_cache(model, [parent for _, parent, _ in survivors],",
                                 "        (lambda *_: None)([parent for _, parent, _ in survivors],", BEAMS),
    "beam-cache-last-row-not-reordered": (TUTORIAL, "span[: len(parents)] = span[rows]",
                                          "span[: len(parents) - 1] = span[rows[:-1]]", BEAMS),
    "beam-cache-prompt-not-copied": (TUTORIAL, "0 if step == 0 else len(prompt_ids),", "len(prompt_ids),", BEAMS),
    "beam-length-penalty-ignored": (TUTORIAL, "finished.append((score / length**length_penalty,",
                                    "finished.append((score / length,", BEAMS),
    "rope-high-frequency-factor": (TUTORIAL, "ROPE_HIGH_FREQ_FACTOR = 4  #", "ROPE_HIGH_FREQ_FACTOR = 2  #",
                                   ROPE_TABLES),
    "rope-factor-8-tutorial": (TUTORIAL, "rope_rotations(args, rope_scale_factor(args))",
                               "rope_rotations(args, ROPE_SCALE_FACTOR)", [ROPE_1B + "[tutorial]"]),
    "rope-factor-8-minimal": (MINIMAL, "rope_rotations(args, rope_scale_factor(args))",
                              "rope_rotations(args, ROPE_SCALE_FACTOR)", [ROPE_1B + "[minimal]"]),
    "prefill-chunks-at-position-0-minimal": (MINIMAL, "start_pos=start_pos + start)", "start_pos=start_pos)",
                                             PREFILL["minimal"]),
    "prefill-chunks-at-position-0-tutorial": (TUTORIAL, "start_pos=start_pos + start)", "start_pos=start_pos)",
                                              PREFILL["tutorial"]),
    "int8-copy-path-drops-scales": (KERNELS, "return F.linear(x, weight.to(x.dtype)) * scales",
                                    "return F.linear(x, weight.to(x.dtype))", QUANTIZED),
    "int4-offset-forgotten": (LAYOUTS, "zero = low + INT4_MIDPOINT * scale", "zero = low", QUANTIZED),
    "int8-scale-off": (LAYOUTS, "torch.maximum(-low, high).clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX",
                       "torch.maximum(-low, high).clamp_(min=torch.finfo(torch.float32).tiny) / (INT8_MAX + 1)",
                       QUANTIZED),
    "top-p-mask-removed": (TUTORIAL, "sorted_probs[outside_nucleus] = 0.0", "sorted_probs[outside_nucleus] *= 1.0",
                           SAMPLING),
    "temperature-ignored": (TUTORIAL, "keepdim=True)) / temperature, dim=-1)", "keepdim=True)), dim=-1)",
                            SAMPLING),
    "tiny-temperature-overflows": (TUTORIAL, "torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature",
                                   "torch.softmax((logits - 0 * logits.amax(dim=-1, keepdim=True)) / temperature",
                                   ["tests/test_generation.py", "-k", "near_zero_temperature"]),
    "query-heads-read-the-wrong-kv-head": (
        SPEEDUPS, "grouped = queries.reshape(batch, self.n_local_kv_heads, self.n_rep, self.head_dim)",
        "grouped = queries.reshape(batch, self.n_rep, self.n_local_kv_heads, self.head_dim).transpose(1, 2)", LOGITS),
    "prompt-chunk-without-causal-mask": (SPEEDUPS, "attn_mask=mask, enable_gqa=True", "enable_gqa=True",
                                         PREFILL["minimal"]),
    "logits-of-the-first-position": (SPEEDUPS, "return self.layer(h[:, -1:])", "return self.layer(h[:, :1])",
                                     PREFILL["tutorial"]),
    "kv-cache-default-length": (MINIMAL, "ModelArgs(**params, max_seq_len=max_seq_len,", "ModelArgs(**params,",
                                MODULES),
    "speedups-always-on": (MINIMAL, "    if use_speedups:\n", "    if True:\n", MODULES),
    "tied-weights-untied": (CHECKPOINT, "        model.output.weight = embeddings", "        pass",
                            ["tests/test_speedups.py", "-k", "tied_weights_stay_one_tensor"]),
    "chat-reply-not-closed": (TUTORIAL, "dialog += reply + [closing_token(tokenizer, chosen)]", "dialog += reply",
                              CHAT),
    "chat-cache-not-kept": (TUTORIAL, "        return len(dialog) + len(reply)\n", "        return 0\n", CHAT),
    "chat-cut-reply-last-token-not-fed": (TUTORIAL, "if reply and (interrupted or len(reply) == MAX_NEW_TOKENS):",
                                          "if reply and interrupted:", CHAT),
    "torchrun-collectives-skipped": (LAYOUTS, "several = get_model_parallel_world_size() > 1", "several = False",
                                     ["tests/test_model_parallel.py::test_two_processes_decode_the_single_process_tokens"]),
    "torchrun-threads-not-shared": (DEVICES, "return max(1, physical_cores // local_processes)", "return None",
                                    PLATFORM),
    "bfloat16-on-a-t4": (DEVICES, "tuple(capability) < BF16_CAPABILITY", "tuple(capability) < (7, 5)", PLATFORM),
    "mps-under-torchrun": (DEVICES, '"mps" if has_mps and world_size == 1 else', '"mps" if has_mps else', PLATFORM),
    "nan-check-skipped": (MINIMAL, "        report.check_finite(logits, model.norm.weight.dtype)\n",
                          "        pass\n", ["tests/test_bad_input.py", "-k", "nan_in_the_weights and minimal"]),
    "locale-encoding-kept": (EXITS, 'if encoding.lower().replace("-", "") != "utf8"', "if False",
                             ["tests/test_scripts.py", "-k", "utf8_whatever_the_locale"]),
    "by-hand-head-reads-the-wrong-kv-head": (
        TUTORIAL, "q = q.float().view(batch, seqlen, kv_heads, heads // kv_heads, head_dim)",
        "q = q.float().view(batch, seqlen, heads // kv_heads, kv_heads, head_dim).transpose(2, 3)", LAYER),
    "by-hand-causal-mask-dropped": (TUTORIAL, "scores = scores.masked_fill(~causal, float(\"-inf\"))",
                                    "scores = scores", LAYER),
    "lens-without-the-final-norm": (TUTORIAL, "logits = model.output(model.norm(x)[:, None])[:, -1].float()",
                                    "logits = model.output(x[:, None])[:, -1].float()", LOOK_NUMBERS),
    # The look inside (tests/test_look_inside.py): its numbers, each column of its table, its picture, its memory.
    "look-lens-softmax-over-positions": (TUTORIAL, "(top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()",
                                         "(top_logits - logits.logsumexp(dim=0, keepdim=True)).exp()", LOOK_NUMBERS),
    "look-chunks-at-position-0": (TUTORIAL, "x, weights = layer_by_hand(block, x, start, model.freqs_cis)",
                                  "x, weights = layer_by_hand(block, x, 0, model.freqs_cis)", LOOK_CHUNKS),
    "look-heads-of-the-next-layer": (TUTORIAL, "        if number == layer:", "        if number == layer + 1:",
                                     LOOK_NUMBERS),
    "look-attention-of-the-position-before": (TUTORIAL, "last_rows.append(weights[0, :, -1])",
                                              "last_rows.append(weights[0, :, -2])", LOOK_NUMBERS),
    "look-attention-softmax-over-queries": (TUTORIAL, "weights = torch.softmax(scores, dim=-1)",
                                            "weights = torch.softmax(scores, dim=-2)", LOOK_TABLE),
    "look-in-one-chunk": (TUTORIAL, "range(first, end, PREFILL_CHUNK):\n        chunk_probs, chunk_ids, "
                          "last_attention, chunk_maps = look_at_chunk(\n            model, prompt_ids, start, "
                          "min(start + PREFILL_CHUNK, end)",
                          "range(first, end, end):\n        chunk_probs, chunk_ids, last_attention, "
                          "chunk_maps = look_at_chunk(\n            model, prompt_ids, start, end", LOOK_MEMORY),
    "look-table-layers-numbered-from-0": (TUTORIAL, 'print(f"{layer + 1:>5}  {predicted:<54}{read}"',
                                          'print(f"{layer:>5}  {predicted:<54}{read}"', LOOK_TABLE),
    "look-table-lens-of-the-first-position": (TUTORIAL, "top_probs, top_ids = look.probs[:, -1], look.token_ids[:, -1]",
                                              "top_probs, top_ids = look.probs[:, 0], look.token_ids[:, 0]",
                                              LOOK_TABLE),
    "look-table-lens-probabilities-of-other-tokens": (
        TUTORIAL, "for p, i in zip(top_probs[layer].tolist(), top_ids[layer].tolist()))",
        "for p, i in zip(top_probs[layer].tolist(), top_ids[layer].flip(0).tolist()))", LOOK_TABLE),
    "look-table-attention-of-one-head": (TUTORIAL, "mean_weights = look.last_attention.mean(dim=1)",
                                         "mean_weights = look.last_attention[:, 0]", LOOK_TABLE),
    "look-table-attention-of-the-layer-before": (TUTORIAL, "top_weights, top_positions = mean_weights.topk(",
                                                 "top_weights, top_positions = mean_weights.roll(1, dims=0).topk(",
                                                 LOOK_TABLE),
    "look-table-attention-tokens-shifted": (TUTORIAL, 'f"{tokenizer.decode([prompt_ids[i]])!r} {w:.2f}"',
                                            'f"{tokenizer.decode([prompt_ids[i - 1]])!r} {w:.2f}"', LOOK_TABLE),
    "look-picture-lens-transposed": (PICTURE, "image = axes.imshow(top, cmap=colours",
                                     "image = axes.imshow(top.T, cmap=colours", LOOK_PICTURE),
    "look-picture-cell-texts-transposed": (PICTURE, "axes.text(position, layer, token_label(",
                                           "axes.text(layer, position, token_label(", LOOK_PICTURE),
    "look-picture-heads-transposed": (PICTURE, "image = axes.imshow(maps[head].cpu().numpy(),",
                                      "image = axes.imshow(maps[head].cpu().numpy().T,", LOOK_PICTURE),
    "look-picture-heads-of-the-layer-below": (TUTORIAL, "look = look_inside(model, prompt_ids, layer, max(",
                                              "look = look_inside(model, prompt_ids, layer - 1, max(", LOOK_PICTURE),
    "look-picture-summed-column-misses-position-1": (
        PICTURE, "maps = torch.cat([look.head_maps[:, :, 1 : look.first].sum(",
        "maps = torch.cat([look.head_maps[:, :, 2 : look.first].sum(", LOOK_LONG_PICTURE),
    "look-picture-window-ignored": (TUTORIAL, "max(0, len(prompt_ids) - LOOK_INSIDE_POSITIONS))", "0)",
                                    LOOK_LONG_PICTURE),
    # RoPE built with Llama 3's theta whatever params.json says: the random-weight tests cannot tell (all
    # theirs use 500,000); SmolLM2's real weights can (NLL of tests/english.txt 3.28 -> 3.36 nats).
    "rope-theta-ignored-tutorial": (TUTORIAL, "freqs = 1.0 / (args.rope_theta ** (", "freqs = 1.0 / (500000.0 ** (",
                                    [REAL_NLL + "[tutorial]"]),
    "rope-theta-ignored-minimal": (MINIMAL, "freqs = 1.0 / (args.rope_theta ** (", "freqs = 1.0 / (500000.0 ** (",
                                   [REAL_NLL + "[minimal]"]),
    # A kernel must build, run and be right before it is used (an AVX2-only CPU crashed at load, and oneDNN's
    # int8 x int8 was 7-9% off there).
    "layout-build-unguarded": (CALIBRATION, "    except Exception as error:  # an instruction set or a build",
                               "    except ZeroDivisionError as error:  # an instruction set or a build",
                               UNBUILDABLE),
    "wrong-kernel-not-excluded": (CALIBRATION, 'return f"wrong here: {error:.1%} off"', "return None", WRONG),
    "kernel-that-raises-not-caught": (CALIBRATION, '        return None, f"fails: {reason(error)}"',
                                      "        raise", WRONG),
    "busy-calibration-kept": (CALIBRATION, "median(self.steps) < self.FASTER * self.linear_seconds",
                              "median(self.steps) < 0 * self.linear_seconds",
                              ["tests/test_kernels.py", "-k", "busier_machine"]),
    "q4-bf16-rows-shifted": ("speedups/kernels.py", "        return buffer.copy_(block)",
                             "        return buffer.copy_(block.roll(1, 0))",
                             ["tests/test_quantize.py", "-k", "4_bit_chunk_kernels"]),
    "widening-blocks-overlap": ("speedups/kernels.py", "        end = min(start + step, module.out_features)",
                                "        end = min(start + step + 1, module.out_features)",
                                ["tests/test_quantize.py", "-k", "4_bit_chunk_kernels"]),
    "widening-buffer-in-autograd": ("speedups/kernels.py", "@torch.no_grad()  # the buffer is shared",
                                    "# the buffer is shared",
                                    ["tests/test_quantize.py", "-k", "widened_products_outside"]),
    "isa-cap-ignored": ("speedups/native.py", "if ISA_RANKS.get(name, 0) <= isa_cap()]", "]",
                        [NATIVE_TESTS, "-k", "caps_hold"]),
    "no-compiler-not-noticed": (SPEEDUPS, 'kernel_choice(kernels) != "rule" and native.library() is not None',
                                'kernel_choice(kernels) != "rule"', ["tests/test_kernels.py", "-k", "without_a_compiler"]),
    "closed-pipe-is-an-error": (EXITS, "return isinstance(error, BrokenPipeError) or", "return False and",
                                ["tests/test_scripts.py", "-k", "closed_pipe and minimal"]),
    "params-heads-unchecked": (CHECKPOINT, "    if dim % heads or dim // heads % 2:", "    if False:",
                               BAD_INPUT["sizes_are_not_a_llamas"]),
    "params-groups-unchecked": (CHECKPOINT, "    if heads % kv_heads:", "    if False:",
                                BAD_INPUT["sizes_are_not_a_llamas"]),
    "params-types-unchecked": (CHECKPOINT, "        if field in params and not check(params[field]):",
                               "        if False:", BAD_INPUT["sizes_are_not_a_llamas"]),
    "params-job-fields-kept": (CHECKPOINT, "if key not in JOB_FIELDS and not", "if not", BAD_INPUT["job_fields"]),
    "quantized-checkpoint-not-refused": (CHECKPOINT, "    if fields:\n", "    if False:\n",
                                         BAD_INPUT["sizes_are_not_a_llamas"]),
    "weights-dtype-unchecked": (CHECKPOINT, "if weights[name].dtype not in WEIGHT_DTYPES or",
                                "if False and weights[name].dtype not in WEIGHT_DTYPES or",
                                BAD_INPUT["floating_point"]),
    "a-fifo-is-a-file": (CHECKPOINT, "    if stat.S_ISREG(mode):", "    if True:",
                         BAD_INPUT["weights_file_that_is_not_a_file"]),
    "dangling-link-called-missing": (CHECKPOINT, 'return f"is a link to {os.readlink(path)}, which does not exist" if',
                                     "return MISSING if", BAD_INPUT["weights_file_that_is_not_a_file"]),
    "input-file-size-unchecked": (SETTINGS, "    if size > limit:", "    if False:", BAD_INPUT["context_can_hold"]),
    "chat-stdin-unchecked": (TUTORIAL, "        settings.check_chat_input()", "        pass", BAD_INPUT["stdin"]),
    "seed-unbounded": (SETTINGS, '"SEED": (0, 2**64 - 1)', '"SEED": (None, None)', BAD_INPUT["out_of_range"]),
    "ctrl-c-in-the-imports-traceback": (EXITS, "sys.excepthook = interrupted_quietly", "", BAD_INPUT["ctrl_c_during"]),
    "model-name-may-be-a-path": (CHECKPOINT, 'and not {"/", "\\\\"} & set(model_name):', ":",
                                 BAD_INPUT["folder_and_its_name"]),
    "models-dir-may-be-a-file": (CHECKPOINT, "    if path.exists() and not path.is_dir():", "    if False:",
                                 BAD_INPUT["folder_and_its_name"]),
    "one-terminal-streams-into-the-token-lines": (TUTORIAL, "    if not (SHOW_TOKENS and report.one_terminal()):",
                                                  "    if True:", ["tests/test_scripts.py", "-k", "token_lines_read"]),
    "any-two-terminals-are-one": (REPORT, "return terminals and (out.st_rdev, out.st_ino) == (err.st_rdev,",
                                  "return terminals or (out.st_rdev, out.st_ino) == (err.st_rdev,",
                                  ["tests/test_scripts.py", "-k", "one_terminal_means"]),
    "hub-hint-says-huggingface-cli": (CHECKPOINT, "Hugging Face Hub: hf download {repository}",
                                      "Hugging Face Hub: huggingface-cli download {repository}",
                                      README_TESTS["error_lines"]),
    "readme-says-huggingface-cli": (README, "hf download meta-llama/Llama-3.2-1B-Instruct --include",
                                    "huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --include",
                                    README_TESTS["every_command"]),
    "readme-cpu-torch-after-requirements": (
        README, "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\npip install -r "
        "requirements.txt\n", "pip install -r requirements.txt\npip install torch==2.13.0 --index-url "
        "https://download.pytorch.org/whl/cpu\n", README_TESTS["what_ci_runs"]),
    "readme-python-3.10": (README, "Python 3.11 or newer", "Python 3.10 or newer", README_TESTS["python_floor"]),
    "readme-torchrun-up-to-8": (README, "that is 1, 2, 4 or 8 processes", "that is 1 to 8 processes",
                                README_TESTS["process_counts"]),
    "stand-in-not-found-by-name": (CHECKPOINT, "    if not model_dir.is_dir() and model_name in STANDIN_NAMES:",
                                   "    if False:", ["tests/test_standin.py", "-k", "found_by_its_name"]),
    # (these two change standin/smollm.py, so its cache key: their tests must not make the real stand-in)
    "stand-in-relative-xdg-cache-home": (STANDIN, "Path(base) if os.path.isabs(base) else", "Path(base) if base else",
                                         ["tests/test_standin.py", "-k", "relative_xdg"]),
    "stand-in-interrupted-build-left": (STANDIN, "        shutil.rmtree(building, ignore_errors=True)", "        pass",
                                        ["tests/test_standin.py", "-k", "interrupted_build"]),
    # The suite's own grouping on pytest-xdist workers: the 1B tests split over both would each write the 2.5 GB
    # checkpoint and compute transformers' logits (35 s), and, with the other worker's, could fill the memory.
    "xdist-1b-group-dropped": ("tests/conftest.py", "item.add_marker(pytest.mark.xdist_group(LLAMA_1B_GROUP))",
                               "pass", [ROPE_1B]),
    # Our C++ kernels: the SIMD variants' activation rounding, the scalar int8 loop, every kernel's tail block,
    # the offset term of int4 (SIMD and scalar).
    "native-activation-scale-off": (NATIVE, "std::max(max_of(magnitude) / float(kInt8Max), FLT_MIN)",
                                    "std::max(max_of(magnitude) / float(kInt8Max + 1), FLT_MIN)",
                                    [NATIVE_TESTS, "-k", "activation_codes"]),
    "native-int8-scale-of-another-row": (NATIVE, "y.store(r, n, sum * weight_scales[n]);",
                                         "y.store(r, n, sum * weight_scales[n0]);",
                                         [NATIVE_TESTS, "-k", "int8_product and scalar"]),
    "native-tail-block-dropped": (NATIVE, "blocks((in_ + kBlock - 1) / kBlock)", "blocks(in_ / kBlock)",
                                  [NATIVE_TESTS, "-k", "int8_product"]),
    "native-int4-offset-sign": (NATIVE, "offset[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(a.offsets_of(r0 + r)[b]), offset[r]);",
                                "offset[r] = _mm512_fnmadd_ps(low, _mm512_set1_ps(a.offsets_of(r0 + r)[b]), offset[r]);",
                                [NATIVE_TESTS, "-k", "int4_product"]),
    "native-int4-offset-sign-scalar": (NATIVE, "sum += tile_low(block, j) * a.offsets_of(r)[b];",
                                       "sum -= tile_low(block, j) * a.offsets_of(r)[b];",
                                       [NATIVE_TESTS, "-k", "int4_product and scalar"]),
    # int4 in tiles of 16 rows: the scales read where the lows are, the last (short) tile dropped, AVX2 reading a
    # tile's first 8 rows twice, dequantising every row of a tile from its first row's bytes.
    "native-int4-scales-read-as-lows": (NATIVE, "_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + kTileScales)))",
                                        "_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + kTileLows)))",
                                        [NATIVE_TESTS, "-k", "int4_product"]),
    "native-int4-short-tile-dropped": (NATIVE, "for_rows(rows, tiles.size(0), w.blocks * kTileBlockBytes",
                                       "for_rows(rows, out / kTile, w.blocks * kTileBlockBytes",
                                       [NATIVE_TESTS, "-k", "int4_product"]),
    "native-int4-256-bit-second-half-lost": (NATIVE, "(block + kTileCodes + 64 * i + 32 * h)", "(block + kTileCodes + 64 * i)",
                                             [NATIVE_TESTS, "-k", "int4_product and avx2"]),
    "native-int4-dequantize-first-lane": (NATIVE, "block + kTileCodes + i * 4 * kTile + 4 * j, 4);",
                                          "block + kTileCodes + i * 4 * kTile, 4);", [NATIVE_TESTS, "-k", "dequantising"]),
    "int4-rows-view-from-the-first-row": (LAYOUTS, "weight=self.weight[start // native.TILE : -(-end // native.TILE)]",
                                          "weight=self.weight[: -(-(end - start) // native.TILE)]",
                                          ["tests/test_quantize.py", "-k", "rows_of_our"]),
    # AVX2's int8 tiles for prompt chunks: the sign moved to the wrong operand, an odd last weight row dropped.
    "native-int8-tile-sign-lost": (NATIVE, "_mm256_maddubs_epi16(magnitude[k], _mm256_sign_epi8(q, w[k]))",
                                   "_mm256_maddubs_epi16(magnitude[k], q)", AVX2_INT8),
    "native-int8-tile-odd-row-dropped": (NATIVE, "if (n < n1) int8_tile_avx2<kR, 1>",
                                         "if (false) int8_tile_avx2<kR, 1>", AVX2_INT8),
    # The read-ahead setting not kept (benchmarks/bench_kernels.py would time "off" with it on).
    "native-read-ahead-setting-ignored": (NATIVE, "  read_ahead = bytes;\n", "\n",
                                          [NATIVE_TESTS, "-k", "read_ahead"]),
    # StepThreads: trials at a fixed period (a slower count's steps every 32), a busier machine not noticed.
    "step-threads-fixed-period": (CALIBRATION, "self.period = min(2 * self.period, self.MAX_PERIOD) if backing_off",
                                  "self.period = self.PERIOD if backing_off", STEP_THREADS),
    "step-threads-backs-off-on-one-thread": (CALIBRATION, "backing_off = kept == self.current == self.counts[0]",
                                             "backing_off = kept == self.current", STEP_THREADS),
    "step-threads-busier-not-noticed": (CALIBRATION, "elif self.taken >= self.next_trial or self.busier():",
                                        "elif self.taken >= self.next_trial:", STEP_THREADS),
    # A trial of the other thread count whose first step already loses would still run all its steps; would end
    # only when far slower (the old rule); a trial of all threads would be judged as one of one thread.
    "step-threads-trial-runs-on-when-it-loses": (CALIBRATION, "lost = len(trial) == 1 and not self.wins(",
                                                 "lost = False and not self.wins(", STEP_THREADS),
    "step-threads-trial-ends-only-when-far-slower": (
        CALIBRATION, "not self.wins(threads, trial[0], median(self.steps[self.current]))",
        "trial[0] > self.SLOWDOWN * median(self.steps[self.current])", STEP_THREADS),
    "step-threads-trial-of-all-judged-as-one": (CALIBRATION, "return (one * self.FEWER_MARGIN < every) == (count == 1)",
                                                "return one * self.FEWER_MARGIN < every", STEP_THREADS),
    # No margin: one thread kept on a near tie; a stock kernel chosen over ours when it times barely faster.
    "step-threads-one-thread-on-a-tie": (CALIBRATION, "    FEWER_MARGIN = 1.1", "    FEWER_MARGIN = 1.0", STEP_THREADS),
    "stock-kernel-on-a-tie": (CALIBRATION, "OURS_MARGIN = 1.15", "OURS_MARGIN = 1.0",
                              ["tests/test_kernels.py", "-k", "the_choice_is_the_fastest"]),
    # Decoding one row would time other layouts on one copied layer again.
    "one-row-tries-other-layouts": (CALIBRATION, '    if decode_class == "one":\n', '    if False:\n',
                                    ["tests/test_kernels.py", "-k", "one_row_never_tries"]),
    # Weights in 2 MiB pages: the request for them, the memory the joined weights are built in.
    "huge-pages-not-asked-for": (LAYOUTS, "        memory.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE",
                                 "        memory.madvise(mmap.MADV_HUGEPAGE, start, 0 // HUGE_PAGE", [HUGE_PAGES]),
    "weights-in-small-pages": (LAYOUTS, "    memory = empty_in_huge_pages(shape, dtype) if torch.Size(shape).numel()",
                               "    memory = None if torch.Size(shape).numel()", [HUGE_PAGES]),
    # the file's own weights (wo, w2, the output table in bfloat16): not copied, or copied from the wrong rows
    "file-weights-left-in-the-file": (SPEEDUPS, "                move_into_weight_memory(module.weight)",
                                      "                pass", [HUGE_PAGES]),
    "file-weights-copied-from-the-first-rows": (LAYOUTS, "copy[start : start + rows].copy_(weight[start : start + rows])",
                                                "copy[start : start + rows].copy_(weight[: len(copy[start : start + rows])])",
                                                [HUGE_PAGES]),
    # Two processes building the library at once: each build's compiles must not overlap the other's.
    "build-lock-not-taken": ("speedups/native.py", "        _lock(lock, progress)\n", "",
                             [NATIVE_TESTS, "-k", "one_at_a_time"]),
    # decoding.cpp's one-call RMSNorm and RoPE into the cache, and their use by the model
    "one-call-norm-epsilon-lost": (DECODING, "std::sqrt(squares / float(dim) + eps)", "std::sqrt(squares / float(dim))",
                                   [NATIVE_TESTS, "-k", "rms_norm"]),
    "one-call-norm-rounded-once": (DECODING, "narrow<T>(widen(narrow<T>(widen(row[j]) * r_inv)) * widen(weight[j]))",
                                   "narrow<T>(widen(row[j]) * r_inv * widen(weight[j]))", [NATIVE_TESTS, "-k", "rms_norm"]),
    "one-call-norm-tail-not-squared": (DECODING, "for (; i < dim; i++) partial", "for (; i < 0; i++) partial",
                                       [NATIVE_TESTS, "-k", "rms_norm"]),
    "one-call-rope-sine-sign": (DECODING, "out[2 * i] = narrow<T>(a * c - b * s);", "out[2 * i] = narrow<T>(a * c + b * s);",
                                [NATIVE_TESTS, "-k", "rotate_into_cache"]),
    "one-call-cache-one-position-late": (DECODING, "max_seq + start + s) * head_dim", "max_seq + start + s + 1) * head_dim",
                                         [NATIVE_TESTS, "-k", "rotate_into_cache"]),
    "one-call-values-rotated": (DECODING, "std::copy(value, value + head_dim, cache_v + at);",
                                "rotate_head(value, rotation, cache_v + at, head_dim);", [NATIVE_TESTS, "-k", "rotate_into_cache"]),
    "one-call-caches-swapped": (SPEEDUPS, "torch.view_as_real(freqs_cis), self.cache_k, self.cache_v,",
                                "torch.view_as_real(freqs_cis), self.cache_v, self.cache_k,",
                                [f"{CHUNKED}[minimal-speedups-on-one-call-7]"]),
    "one-call-norms-not-swapped-in": (SPEEDUPS, "        model.norm = OneCallRMSNorm(model.norm)\n", "",
                                      [f"{CHUNKED}[minimal-speedups-on-one-call-7]"]),
    # speculative decoding (run_inference.py's DRAFT)
    "speculation-keeps-a-rejected-draft": (TUTORIAL, "    return drafts[:kept] + [choices[kept]]",
                                           "    return drafts[: kept + 1] + [choices[kept]]", SPECULATIVE_GREEDY),
    "verify-pass-one-position-late": (TUTORIAL, "logits = verify(model, [token_ids[-1], *drafts], pos)",
                                      "logits = verify(model, [token_ids[-1], *drafts], pos + 1)", SPECULATIVE_GREEDY),
    "verify-reads-the-last-position-only": (SPEEDUPS, "        if self.every_position:\n", "        if False:\n",
                                            SPECULATIVE_GREEDY),
    "draft-cache-not-rolled-back": (TUTORIAL, "agreed = common_prefix_length(self.cached, token_ids[:-1])",
                                    "agreed = min(len(self.cached), len(token_ids) - 1)",
                                    [SPECULATIVE + "test_a_draft_model_drafts_what_it_would_from_scratch"]),
    "draft-cache-claims-its-last-draft": (TUTORIAL, "        return drafts, torch.stack(probs) if probs else None",
                                          "        self.cached += drafts[-1:]\n"
                                          "        return drafts, torch.stack(probs) if probs else None",
                                          [SPECULATIVE + "test_a_draft_model_drafts_what_it_would_from_scratch"]),
    "draft-cache-not-kept": (TUTORIAL, "agreed = common_prefix_length(self.cached, token_ids[:-1])", "agreed = 0",
                             [SPECULATIVE + "test_chat_keeps_the_draft_models_cache_across_turns"]),
    "rejection-draws-from-p": (TUTORIAL, "residual = (p[i] - q).clamp(min=0)", "residual = p[i].clone()",
                               SPECULATIVE_SAMPLING),
    "acceptance-ignores-q": (TUTORIAL, "< p[i, draft] / q[draft]:", "< p[i, draft]:", SPECULATIVE_SAMPLING),
    "lookup-takes-the-first-match": (TUTORIAL, "for start in range(len(token_ids) - n - 1, -1, -1):",
                                     "for start in range(len(token_ids) - n):",
                                     [SPECULATIVE + "test_prompt_lookup_proposes_what_followed_the_latest_longest_"
                                      "match"]),
    "speculation-counts-the-models-token-as-accepted": (TUTORIAL, "accepted=len(kept) - 1)", "accepted=len(kept))",
                                                        [SPECULATIVE + "test_the_script_with_a_draft_prints_greedys_"
                                                         "text_and_what_the_drafts_did"]),
}


def copy_project(destination):
    """The files git tracks, or would (untracked but not ignored), as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(folder, tests):
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True)


def try_mutant(name, file, old, new, tests):
    """(caught, seconds, the last line pytest printed)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as folder:
        folder = Path(folder)
        copy_project(folder)
        (folder / file).write_text((folder / file).read_text().replace(old, new))
        start = time.perf_counter()
        result = run_tests(folder, tests)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        return result.returncode != 0, time.perf_counter() - start, last


def main():
    parser = argparse.ArgumentParser(description="Plant one-line bugs and check that the tests catch each.")
    parser.add_argument("--only", help="comma-separated mutant names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on an unchanged copy")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(MUTANTS)
    unknown = set(chosen) - set(MUTANTS)
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}; see --list")
    if args.list:
        for name, (file, old, new, tests) in MUTANTS.items():
            print(f"{name}: {file}: {old.strip()!r} -> {new.strip()!r}; tests: {' '.join(tests)}")
        return
    for name in chosen:  # before anything slow: every mutant's line must still be in its file, once
        file, old, _, _ = MUTANTS[name]
        if (REPO / file).read_text().count(old) != 1:
            parser.error(f"mutant {name}: {old!r} is not in {file} exactly once: update it")
    if not args.no_baseline:
        print("the tests on an unchanged copy ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as folder:
            copy_project(Path(folder))
            for tests in {tuple(MUTANTS[name][3]) for name in chosen}:
                result = run_tests(folder, list(tests))
                if result.returncode != 0:
                    raise SystemExit(f"the tests fail without a mutant ({' '.join(tests)}): "
                                     f"{(result.stdout.strip().splitlines() or ['?'])[-1]}")
    survived = []
    for name in chosen:
        caught, seconds, last = try_mutant(name, *MUTANTS[name])
        print(f"{'caught  ' if caught else 'SURVIVED'} {name} ({seconds:.0f} s): {last}", flush=True)
        if not caught:
            survived.append(name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutants caught" +
          (f"; survived: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()

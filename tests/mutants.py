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
CHECKPOINT, DEVICES, EXITS = "support/checkpoint.py", "support/devices.py", "support/exits.py"
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
SAMPLING = ["tests/test_generation.py::test_the_script_samples_from_the_nucleus_at_its_temperature"]
CHAT = ["tests/test_chat.py::test_each_reply_is_a_fresh_runs_and_each_turn_feeds_only_its_new_tokens"]
PLATFORM = ["tests/test_platform.py"]
LAYER = ["tests/test_layer.py", "-k", "float32 or transformers"]
# Real trained weights (SmolLM2-135M, RoPE theta 100,000): every random checkpoint has Llama 3's theta, 500,000.
REAL_NLL = "tests/test_real_weights.py::test_english_is_predictable_in_float32"  # [minimal] or [tutorial]
MODULES = [SPEEDUPS_TESTS + "test_speedups_off_runs_llama_models_as_written",
           SPEEDUPS_TESTS + "test_speedups_swap_named_modules"]
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
    "int8-copy-path-drops-scales": (SPEEDUPS, "return F.linear(x, weight.to(x.dtype)) * scales",
                                    "return F.linear(x, weight.to(x.dtype))", QUANTIZED),
    "int4-offset-forgotten": (SPEEDUPS, "zero = low + INT4_MIDPOINT * scale", "zero = low", QUANTIZED),
    "int8-scale-off": (SPEEDUPS, "torch.maximum(-low, high).clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX",
                       "torch.maximum(-low, high).clamp_(min=torch.finfo(torch.float32).tiny) / (INT8_MAX + 1)",
                       QUANTIZED),
    "top-p-mask-removed": (TUTORIAL, "sorted_probs[outside_nucleus] = 0.0", "sorted_probs[outside_nucleus] *= 1.0",
                           SAMPLING),
    "temperature-ignored": (TUTORIAL, "torch.softmax(logits.float() / temperature, dim=-1)",
                            "torch.softmax(logits.float(), dim=-1)", SAMPLING),
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
    "lens-without-the-final-norm": (TUTORIAL, "normed = model.norm(torch.stack(streams))",
                                    "normed = torch.stack(streams)", LAYER),
    # RoPE built with Llama 3's theta whatever params.json says: the random-weight tests cannot tell (all
    # theirs use 500,000); SmolLM2's real weights can (NLL of tests/english.txt 3.28 -> 3.36 nats).
    "rope-theta-ignored-tutorial": (TUTORIAL, "freqs = 1.0 / (args.rope_theta ** (", "freqs = 1.0 / (500000.0 ** (",
                                    [REAL_NLL + "[tutorial]"]),
    "rope-theta-ignored-minimal": (MINIMAL, "freqs = 1.0 / (args.rope_theta ** (", "freqs = 1.0 / (500000.0 ** (",
                                   [REAL_NLL + "[minimal]"]),
    "closed-pipe-is-an-error": (EXITS, "return isinstance(error, BrokenPipeError) or", "return False and",
                                ["tests/test_scripts.py", "-k", "closed_pipe and minimal"]),
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

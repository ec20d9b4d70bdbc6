"""python -m standin: make the SmolLM2 stand-in if needed, print the LLAMA_MODELS_DIR that holds it."""

from standin import smollm
from support import exits

if __name__ == "__main__":
    exits.run(lambda: print(smollm.smollm_models_dir()))

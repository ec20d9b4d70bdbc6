"""What both scripts need that is not about the model, one module per concern. Each module imports only
those listed before it, so every import points one way, from the scripts down:

    torchrun.py    how many processes torchrun started, and which one this is
    exits.py       how a script ends: one line on stderr for an error, Ctrl-C, a closed pipe, UTF-8 output
    settings.py    the settings from the environment, checked against their ranges; the prompt; a chat's stdin
    devices.py     device, number format, threads; torch.distributed and fairscale's groups
    checkpoint.py  the checkpoint folder, params.json, tokenizer, shards; building and loading the model; the
                   stand-in's names find standin/'s SmolLM2 (which is made with this module, so imported late)
    memory.py      whether the job fits: the context, the processes, the weights and the KV cache in memory
    report.py      during and after generation: the scores' check, the progress line, speed and memory
    picture.py     the tutorial's look inside drawn as a PNG file (matplotlib, imported only when asked)

Every check stops the script with one line on stderr that says what is wrong and what to do, and a
non-zero exit status. Set DEBUG=1 to see the traceback of an unexpected error instead.
"""

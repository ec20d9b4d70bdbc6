"""What torchrun tells each process it starts, in environment variables (none of them without torchrun)."""

import os


def processes():
    """How many processes torchrun started together (1 without torchrun), and this one's rank."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def local_processes():
    """How many of them run on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def local_rank():
    """This process's number among those on this machine."""
    return int(os.environ.get("LOCAL_RANK", 0))

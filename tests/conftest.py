import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from surgery.io.checkpoint import read_safetensors_header

# Tiny models: more threads only fight over the 2 cores (a 1 ms forward took 0.5 s).
torch.set_num_threads(1)

# Property tests draw the same examples on every run and machine (no example database): a clean clone
# in CI tests what was tested here. SURGERY_HYPOTHESIS_RANDOM=1 explores new examples instead.
settings.register_profile("surgery", derandomize=not os.environ.get("SURGERY_HYPOTHESIS_RANDOM"), database=None)
settings.load_profile("surgery")

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parent.parent / "surgery" / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_checkpoint(model, path: Path, tokenizer_from: str = "tiny-stablelm") -> Path:
    """Save a factories model as a transformers checkpoint with a real tokenizer beside it."""
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        src = ASSETS / tokenizer_from / f
        if src.is_file():
            shutil.copyfile(src, path / f)
    return path


@pytest.fixture(autouse=True)
def verify_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of the source's reference passes, outside its tmp_path: none writes to ~/.cache,
    none sees another's."""
    path = tmp_path_factory.mktemp("surgery-cache")
    monkeypatch.setenv("SURGERY_CACHE", str(path))
    return path


@pytest.fixture
def write_recipe(tmp_path):
    def make(text: str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return make


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes as stored, read from the file by its header (no library in between)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        header = read_safetensors_header(f)
        raw = f.read_bytes()
        start = 8 + struct.unpack("<Q", raw[:8])[0]
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                out[name] = raw[start + a:start + b]
    return out


def exited(proc: subprocess.Popen, what: str, timeout: float = 120) -> str:
    """A run's stderr once it exits; one still running after `timeout` seconds fails the test with every one
    of its threads' stacks (SIGABRT makes one started with `-X faulthandler` print them), so a hang says where it waits."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        pytest.fail(f"{what} still running {timeout:.0f} s after its last input; its threads:\n{err[-20000:]}")

"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case exits 2 with one line, writes nothing.

Each case gets its own directory holding its recipe and, when it names {src}, a copy of a good
tiny llama checkpoint broken by the case's `setup` steps. The whole directory is hashed before and
after the command: nothing may appear in it (no output, no .surgery-tmp-*), nothing may change.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery.cli import main

CASES_FILE = Path(__file__).parent / "bad_inputs" / "cases.yaml"
CASES = yaml.safe_load(CASES_FILE.read_text())
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    return save_checkpoint(model, tmp_path_factory.mktemp("good") / "src")


# --- setup steps: each breaks the copy at `src` (or writes beside it, in the case dir) -------------

def _rewrite_header(path: Path, edit) -> None:
    """Replace the safetensors header by edit(header) padded to the same length (data offsets hold)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    new = edit(json.loads(raw[8:8 + n]))
    body = new if isinstance(new, bytes) else json.dumps(new, separators=(",", ":")).encode()
    assert len(body) <= n
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n:])


def _header(src: Path, kind: str) -> None:
    f = src / WEIGHTS
    if kind == "bad_json":
        _rewrite_header(f, lambda h: b'{"lm_head.weight": [}')
    elif kind == "not_an_object":
        _rewrite_header(f, lambda h: b"[]")
    elif kind == "entry_without_dtype":
        _rewrite_header(f, lambda h: {**h, "lm_head.weight": {k: v for k, v in h["lm_head.weight"].items() if k != "dtype"}})
    elif kind == "dtype_f8":
        _rewrite_header(f, lambda h: {**h, "lm_head.weight": {**h["lm_head.weight"], "dtype": "F8_E4M3"}})
    elif kind == "offsets_disagree_with_shape":  # 64 bytes for a [32] float32 tensor
        def shorten(h):
            start, end = h["model.norm.weight"]["data_offsets"]
            return {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": [start, end - 64]}}

        _rewrite_header(f, shorten)
    elif kind == "metadata_not_strings":
        _rewrite_header(f, lambda h: {**h, "__metadata__": {"format": 1}})
    elif kind == "int_weight":  # the norm's float32 bytes relabelled int32: the same length
        _rewrite_header(f, lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "dtype": "I32"}})
    elif kind == "float_shape":
        _rewrite_header(f, lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [32.0]}})
    elif kind == "overlapping":  # lm_head's offsets are the embedding's: two names, one range of bytes
        _rewrite_header(f, lambda h: {**h, "lm_head.weight": {**h["lm_head.weight"],
                                                              "data_offsets": h["model.embed_tokens.weight"]["data_offsets"]}})
    elif kind == "duplicate_name":  # lm_head's entry renamed model.norm.weight: JSON keeps the last; safetensors refuses
        _rewrite_header(f, lambda h: json.dumps(h, separators=(",", ":")).encode().replace(b'"lm_head.weight"',
                                                                                           b'"model.norm.weight"'))
    elif kind == "unindexed_tail":
        with open(f, "ab") as out:
            out.write(b"\0" * 64)
    elif kind == "length_beyond_file":
        raw = f.read_bytes()
        f.write_bytes(struct.pack("<Q", 10_000_000) + raw[8:])
    else:
        raise ValueError(kind)


def _edit_weights(src: Path, edit) -> None:
    sd = load_file(src / WEIGHTS)
    edit(sd)
    save_file(sd, src / WEIGHTS, metadata={"format": "pt"})


def _poke(sd: dict, tensor: str, value: str) -> None:
    sd[tensor].view(-1)[3] = float(value)


def _config(src: Path, changes: dict) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def _truncate(src: Path, amount) -> None:
    f = src / WEIGHTS
    raw = f.read_bytes()
    f.write_bytes(raw[: int(len(raw) * amount)] if isinstance(amount, float) else raw[:amount])


SETUP = {
    "empty": lambda src, d, arg: (shutil.rmtree(src), src.mkdir()),
    "make_file": lambda src, d, arg: (shutil.rmtree(src), src.write_text("not a checkpoint")),
    "write": lambda src, d, files: [(src / k).write_text(v) for k, v in files.items()],
    "write_beside": lambda src, d, files: [((d / k).parent.mkdir(exist_ok=True), (d / k).write_text(v)) for k, v in files.items()],
    "remove": lambda src, d, pattern: [p.unlink() for p in src.glob(pattern)],
    "config": lambda src, d, changes: _config(src, changes),
    "drop_tensor": lambda src, d, name: _edit_weights(src, lambda sd: sd.pop(name)),
    "add_tensor": lambda src, d, name: _edit_weights(src, lambda sd: sd.__setitem__(name, torch.zeros(3))),
    "poke": lambda src, d, arg: _edit_weights(src, lambda sd: _poke(sd, **arg)),
    "truncate": lambda src, d, amount: _truncate(src, amount),
    "header": lambda src, d, kind: _header(src, kind),
    "shrink_vocab": lambda src, d, rows: _edit_weights(
        src, lambda sd: [sd.__setitem__(n, sd[n][:rows].clone()) for n in ("model.embed_tokens.weight", "lm_head.weight")]),
    "read_only_dir": lambda src, d, name: ((d / name).mkdir(), (d / name).chmod(0o555)),
}


def prepare(case: dict, d: Path, good: Path) -> dict[str, str]:
    src = d / "src"
    shutil.copytree(good, src)
    for step in case.get("setup", []):
        name, arg = (step, None) if isinstance(step, str) else next(iter(step.items()))
        SETUP[name](src, d, arg)
    subs = {"{src}": str(src), "{out}": str(d / "out"), "{dir}": str(d), "{recipe}": str(d / "recipe.yaml")}
    if "recipe" in case:
        text = fill(case["recipe"], subs)
        (d / "recipe.yaml").write_bytes(text.encode(case.get("encoding", "utf-8")))
    return subs


def fill(text: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


def snapshot(d: Path) -> dict[str, str]:
    """Every path under d with the SHA-256 of its content (directories and links included)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def argv_of(case: dict, subs: dict[str, str]) -> list[str]:
    cmd = case.get("command") or ["run", "{recipe}", "--output", "{out}", "--no-verify"]
    return [fill(a, subs) for a in cmd + case.get("args", [])]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead

    return apply


def run_case(case: dict, argv: list[str], capsys) -> tuple[int, str]:
    limit = case.get("file_size_limit")
    if limit:
        proc = subprocess.run([sys.executable, "-m", "surgery", *argv], capture_output=True, text=True,
                              preexec_fn=_limit_file_size(limit), timeout=300)
        return proc.returncode, proc.stderr
    code = main(argv)
    return code, capsys.readouterr().err


def test_the_corpus_is_large_and_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    allowed = {"id", "recipe", "encoding", "command", "args", "setup", "where", "expect", "env", "skip_if", "file_size_limit"}
    for c in CASES:
        assert set(c) <= allowed, (c["id"], set(c) - allowed)
        assert c.get("expect") and c.get("where"), c["id"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, good_source, tmp_path, capsys, monkeypatch):
    if case.get("skip_if") == "cuda" and torch.cuda.is_available():
        pytest.skip("torch sees a GPU here, so this input is not bad")
    if case.get("skip_if") == "root" and os.geteuid() == 0:
        pytest.skip("running as root: a read-only directory does not stop root's writes "
                    "(output-under-a-regular-file and output-disk-full cover unwritable outputs)")
    for k, v in (case.get("env") or {}).items():
        monkeypatch.setenv(k, v)
    d = tmp_path / "case"
    d.mkdir()
    subs = prepare(case, d, good_source)
    argv = argv_of(case, subs)
    before = snapshot(d)

    code, err = run_case(case, argv, capsys)

    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    line = err.rstrip("\n")
    where = fill(case["where"], subs)
    assert line.startswith(f"error: {where}: "), line
    for fragment in case["expect"]:
        assert fill(fragment, subs) in line, (fragment, line)
    assert not (d / "out").exists()
    assert snapshot(d) == before, "the case directory changed: something was written or the source modified"


def test_debug_flag_shows_the_traceback(write_recipe, capsys):
    recipe = write_recipe("name: t\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: 12\n")
    assert main(["--debug", "plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SurgeryError" in err
    assert err.rstrip("\n").splitlines()[-1].startswith(f"error: {recipe}:5:24: ")


def test_disk_full_in_process_removes_the_temporary(good_source, tmp_path, capsys, monkeypatch):
    """ENOSPC while a shard is written: the same clean error, and no temporary left behind."""
    import errno

    from surgery.io import writer

    real = writer.ShardWriter.write
    calls = []

    def full(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, tensor)

    monkeypatch.setattr(writer.ShardWriter, "write", full)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {good_source}\n")
    before = snapshot(tmp_path)
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the output: No space left on device" in err
    assert len(calls) == 4 and snapshot(tmp_path) == before

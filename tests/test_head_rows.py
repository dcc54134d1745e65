"""Comparing two models reads each lm_head a block of vocabulary rows at a time (#27): a float32 and a float64
head are never whole in memory side by side, and the numbers are those of the whole heads."""
from __future__ import annotations

import torch

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery.runtime import evaluation
from surgery.runtime.evaluation import compare, evaluate
from surgery.runtime.sources import CheckpointSource, open_source

BLOCK = 100


class Whole:
    """The same checkpoint as a source that can only load whole tensors."""

    def __init__(self, inner):
        self.inner, self.config, self.where = inner, inner.config, inner.where

    def names(self):
        return self.inner.names()

    def load(self, name, device, dtype):
        return self.inner.load(name, device, dtype)


def test_compare_reads_the_lm_head_in_blocks_of_rows_and_gives_the_numbers_of_the_whole_head(tmp_path, monkeypatch):
    config = make_config("llama", vocab=512, layers=1, hidden_heads=4, kv_heads=2, head_dim=8, intermediate=64)
    config.tie_word_embeddings = False
    path = save_checkpoint(make_model(config, dtype=torch.bfloat16), tmp_path / "llama")
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluation, "CHUNK_BYTES", 8 * 64 * BLOCK)
    whole, rows = [], []
    load, load_rows = CheckpointSource.load, CheckpointSource.load_rows

    def recording_load(self, name, device, dtype):
        whole.append(name)
        return load(self, name, device, dtype)

    def recording_rows(self, name, start, stop, device, dtype):
        rows.append((name, stop - start, dtype))
        return load_rows(self, name, start, stop, device, dtype)

    monkeypatch.setattr(CheckpointSource, "load", recording_load)
    monkeypatch.setattr(CheckpointSource, "load_rows", recording_rows)
    src = open_source(path)
    cpu = torch.device("cpu")
    cmp = compare(evaluate(src, ids, cpu, torch.float32), evaluate(src, ids, cpu, torch.float64))
    assert "lm_head.weight" not in whole
    head = [(n, dt) for name, n, dt in rows if name == "lm_head.weight"]
    assert head and max(n for n, _ in head) <= BLOCK and {dt for _, dt in head} == {torch.float32, torch.float64}

    monkeypatch.setattr(CheckpointSource, "load", load)
    plain = Whole(open_source(path))
    assert compare(evaluate(plain, ids, cpu, torch.float32), evaluate(plain, ids, cpu, torch.float64)) == cmp


def test_head_rows_gives_any_rows_and_blocks_as_the_whole_converted_weight(tmp_path):
    from surgery.runtime.streamed import HeadRows

    config = make_config("llama", vocab=9000, layers=1, hidden_heads=4, kv_heads=2, head_dim=8, intermediate=64)
    config.tie_word_embeddings = False
    src = open_source(save_checkpoint(make_model(config, dtype=torch.bfloat16), tmp_path / "llama"))
    w = src.load("lm_head.weight", torch.device("cpu"), torch.float64)
    rows = HeadRows(src, "lm_head.weight", src.rows("lm_head.weight"), torch.device("cpu"), torch.float64)
    assert rows.shape == w.shape
    assert torch.equal(rows[100:4200], w[100:4200]) and torch.equal(rows[8990:], w[8990:])
    picks = torch.tensor([8999, 3, 3, 5000, 4, 0, 8998])
    assert torch.equal(rows[picks], w[picks])


def _source_and_grown(tmp_path, monkeypatch):
    """A 512-token bf16 Llama, one grown to 560 rows (its block [500, 600) straddles the reference's 512 rows),
    64 ids, and logits in blocks of BLOCK rows."""
    config = make_config("llama", vocab=512, layers=1, hidden_heads=4, kv_heads=2, head_dim=8, intermediate=64)
    config.tie_word_embeddings = False
    src = open_source(save_checkpoint(make_model(config, dtype=torch.bfloat16), tmp_path / "llama"))
    config.vocab_size = 560
    grown = open_source(save_checkpoint(make_model(config, dtype=torch.bfloat16), tmp_path / "grown"))
    monkeypatch.setattr(evaluation, "CHUNK_BYTES", 8 * 64 * BLOCK)
    return src, grown, torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))


def test_a_comparison_made_inside_the_candidates_pass_equals_compare_bit_for_bit_and_reads_the_shared_head_once(
        tmp_path, monkeypatch):
    src, grown, ids = _source_and_grown(tmp_path, monkeypatch)
    cpu = torch.device("cpu")
    ref = evaluate(src, ids, cpu, torch.float32)
    rows = []
    load_rows = CheckpointSource.load_rows

    def recording_rows(self, name, start, stop, device, dtype):
        rows.append((name, dtype))
        return load_rows(self, name, start, stop, device, dtype)

    monkeypatch.setattr(CheckpointSource, "load_rows", recording_rows)
    fused = evaluate(src, ids, cpu, torch.float64, against=(ref,))
    assert {dt for name, dt in rows if name == "lm_head.weight"} == {torch.float64}  # the float32 rows: converted
    assert fused.compared == [compare(ref, evaluate(src, ids, cpu, torch.float64))]
    assert evaluate(grown, ids, cpu, torch.float32, against=(ref,)).compared == [compare(ref, evaluate(grown, ids, cpu,
                                                                                                       torch.float32))]


def test_a_comparison_reading_a_references_kept_logits_equals_recomputing_them_and_recomputes_none(
        tmp_path, monkeypatch):
    src, grown, ids = _source_and_grown(tmp_path, monkeypatch)
    other = open_source(save_checkpoint(make_model(make_config("llama", vocab=512, layers=1, hidden_heads=4, kv_heads=2,
                                                               head_dim=8, intermediate=64), dtype=torch.bfloat16),
                                        tmp_path / "other"))
    cpu = torch.device("cpu")
    plain = evaluate(src, ids, cpu, torch.float32)
    kept = evaluate(src, ids, cpu, torch.float32, keep=True)
    assert not plain.kept and len(kept.kept) == -(-512 // BLOCK)
    calls = []
    logits = kept.streamed.logits
    monkeypatch.setattr(kept.streamed, "logits", lambda hidden, *a, **k: calls.append(hidden.shape[0]) or logits(hidden, *a, **k))
    for candidate, dtype in [(grown, torch.float32), (other, torch.float32), (src, torch.float64)]:
        calls.clear()
        with_kept = evaluate(candidate, ids, cpu, dtype, against=(kept,)).compared
        assert len(calls) <= 1  # its 6 blocks of logits: read, not computed (one call: the logits at flipped top-1s)
        assert with_kept == evaluate(candidate, ids, cpu, dtype, against=(plain,)).compared
        assert compare(kept, evaluate(candidate, ids, cpu, dtype)) == with_kept[0]
    monkeypatch.setattr(evaluation, "KEPT_BYTES", 8 * 64 * 511)
    assert not evaluate(src, ids, cpu, torch.float32, keep=True).kept  # over the budget: recomputed when compared

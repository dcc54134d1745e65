"""grow_vocab: new tokens in the tokenizer and new rows in the model; old tokens' logits exact, the loss
moved by the new rows' probability mass and nothing else."""
import functools
import json
from dataclasses import replace
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ASSETS, save_checkpoint
import factories
from factories import FAMILIES, make_config, make_model
from surgery import api
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.io.checkpoint import InMemoryCheckpoint
from surgery.ops import Exactness
from surgery.runtime.evaluation import Evaluation, compare, evaluate
from surgery.runtime.sources import model_source
from surgery.report import DeadSlice
from surgery.verify.data import with_new_tokens
from surgery.verify.gradient_flow import whole_model_dead_slices as dead_slices
from surgery.verify.reference import measure_reference
from surgery.verify.rules import judge

IDS = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
TOKENS3 = ["surgeryword", {"content": "<|im_start|>", "special": True}, {"content": "<|im_end|>", "special": True}]


def _eval(model, ids) -> Evaluation:
    return evaluate(model_source(model), ids, torch.device("cpu"), next(model.parameters()).dtype)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def _judge(promise, model, grown, ref: Evaluation | None = None, out: Evaluation | None = None):
    """The verdict verification gives, with the noise floor measured on the source model (float64)."""
    import copy

    floor = measure_reference("source", model_source(copy.deepcopy(model)), IDS, torch.device("cpu"), torch.float64, None).floor
    cmp = compare(ref or _eval(model, IDS), out or _eval(grown, IDS))
    return judge(promise, cmp, floor, 1e-4, model.config.vocab_size)


def _scale(model) -> float:
    return float(_logits(model, IDS).abs().max())


def _recipe(write_recipe, source: str, ops: list[dict], out: Path, **verify) -> Path:
    text = {"name": "v", "source": source, "output": str(out), "ops": ops, "verify": {"max_tokens": 512, **verify}}
    return write_recipe(json.dumps(text))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES + tuple(sorted(getattr(factories, "RELEASES", {})))), tied=st.booleans(), n=st.integers(0, 4),
       pad=st.sampled_from([None, 1, 8, 48]), init=st.sampled_from(["mean", "hewitt", "zeros"]))
def test_old_logits_exact_and_loss_moves_by_the_new_rows_mass(family, tied, n, pad, init):
    if n == 0 and pad is None:
        pad = 48
    model = make_model(make_config(family, tied=tied) if family in FAMILIES else factories.release_config(family, tied=tied))
    ops = [{"op": "grow_vocab", "add_tokens": [f"tok{i}" for i in range(n)], "pad_to_multiple_of": pad, "init": init}]
    grown, plan = api.transform(model, ops)
    old = 64
    new = old + n if not pad else -(-(old + n) // pad) * pad
    assert grown.config.vocab_size == plan.final.spec.vocab_size == new
    assert grown.get_input_embeddings().weight.shape[0] == grown.get_output_embeddings().weight.shape[0] == new
    ref, out = _eval(model, IDS), _eval(grown, IDS)
    cmp = compare(ref, out)
    assert cmp.max_logit_diff <= 1e-12 * _scale(model)  # float64: the same sums, to the last bits
    if new > old:
        assert out.loss >= ref.loss  # new rows only add to the normaliser (float32 loss: may round equal)
        # transformers computes the loss in float32 even for a float64 model: agreement to float32 rounding
        assert abs(cmp.rel_change - cmp.expected_rel_change) <= 1e-6
        assert plan.promise.exactness == Exactness.EXACT_OLD_TOKENS
        verdict = _judge(plan.promise, model, grown, ref, out)
        assert verdict.passed, verdict.rule
    if new == old:
        return
    emb = grown.get_input_embeddings().weight.detach()
    mean = model.get_input_embeddings().weight.detach().mean(0)
    if init == "mean":
        assert torch.allclose(emb[old:], mean.expand(new - old, -1), atol=1e-12)
    elif init == "zeros":
        assert not emb[old:].any()
    else:  # hewitt: the mean plus a draw with 1e-9 x the covariance: tiny, non-zero, different per row
        spread = (emb[old:] - mean).abs().max()
        assert 0 < spread < 1e-3 * model.get_input_embeddings().weight.std()
    assert dead_slices(grown, with_new_tokens(IDS, plan.final.spec.meta.added_tokens), plan.final.new_slices) == []


VOCAB_OP = {"op": "grow_vocab", "add_tokens": ["a", "b", "c"], "pad_to_multiple_of": 16, "init": "hewitt"}


@pytest.mark.parametrize("family,tied,ops", [
    ("llama", False, [VOCAB_OP, {"op": "clone_width", "factor": 2}]),
    ("mistral", True, [VOCAB_OP, {"op": "clone_width", "factor": 2, "noise": 0.1}]),
    ("qwen2", False, [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}, VOCAB_OP]),
    ("stablelm", True, [{"op": "grow_mlp", "intermediate_size": "x2"}, {"op": "grow_layers", "num_layers": 3}, VOCAB_OP,
                        {"op": "grow_mlp", "intermediate_size": "+8"}]),
    ("stablelm", False, [{"op": "grow_heads", "num_heads": 6, "num_kv_heads": 3}, {"op": "rescale_norm"}, {"op": "patch_layernorm"},
                         VOCAB_OP]),
])
def test_grow_vocab_composes_with_growth_before_and_after(family, tied, ops):
    model = make_model(make_config(family, tied=tied))
    grown, plan = api.transform(model, ops)
    ref = _eval(model, IDS)
    cmp = compare(ref, _eval(grown, IDS))
    assert grown.config.vocab_size == 80
    assert plan.promise.exactness in (Exactness.EXACT_OLD_TOKENS, Exactness.EXACT_SHIPPED_CODE)
    assert "every old token's logit unchanged" in plan.promise.reason
    verdict = _judge(plan.promise, model, grown, ref)
    assert verdict.passed, verdict.rule
    # transformers computes RMSNorm statistics in float32 even in a float64 model
    assert cmp.max_logit_diff <= 1e-6 * _scale(model)
    assert dead_slices(grown, with_new_tokens(IDS, plan.final.spec.meta.added_tokens), plan.final.new_slices) == []


def test_a_moved_old_logit_fails_the_rule_even_when_the_loss_barely_moves():
    model = make_model(make_config("llama"))
    grown, plan = api.transform(model, [{"op": "grow_vocab", "add_tokens": ["a", "b"]}])
    ref = _eval(model, IDS)
    with torch.no_grad():
        grown.lm_head.weight[7] += 1e-3  # an old token's row
    verdict = _judge(plan.promise, model, grown, ref)
    assert not verdict.passed and any("max |dlogit|" in f for f in verdict.failed)


def test_the_loss_must_move_by_the_new_rows_mass_and_nothing_else():
    model = make_model(make_config("llama"))
    grown, plan = api.transform(model, [{"op": "grow_vocab", "add_tokens": ["a", "b"]}])
    ref, out = _eval(model, IDS), _eval(grown, IDS)
    wrong = replace(out, loss=out.loss * (1 + 1e-3))  # a loss the new rows' logits do not explain
    verdict = _judge(plan.promise, model, grown, ref, wrong)
    assert not verdict.passed and verdict.failed and all("new rows'" in f for f in verdict.failed)
    assert _judge(plan.promise, model, grown, ref, out).passed


def test_the_gradient_check_reports_new_input_rows_that_no_token_reaches():
    """Without the added tokens in the text an untied embedding's new rows get no gradient: the check sees it,
    which is why verification feeds the added tokens in."""
    model = make_model(make_config("llama", tied=False), dtype=torch.float32)
    grown, plan = api.transform(model, [{"op": "grow_vocab", "add_tokens": ["a", "b"], "pad_to_multiple_of": 8}])
    dead = dead_slices(grown, IDS, plan.final.new_slices)
    assert dead == [DeadSlice(tensor="model.embed_tokens.weight", op="grow_vocab", dead=2, of=2)]
    assert dead_slices(grown, with_new_tokens(IDS, plan.final.spec.meta.added_tokens), plan.final.new_slices) == []


def test_after_an_approximate_op_the_tolerance_judges_the_old_vocabulary_not_the_new_rows_mass():
    """An approximate step that also grew the vocabulary: the tolerance applies to the loss net of the new rows' mass."""
    from surgery.ops import Promise
    from surgery.runtime.evaluation import Comparison
    from surgery.verify.rules import NoiseFloor

    quiet = Comparison(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 64, reference_loss=1.0)
    floor = NoiseFloor(quiet)
    promise = Promise(Exactness.APPROXIMATE, "layer copies")
    moved = Comparison(1.02, 0.02, 0.5, 0.1, 0.9, 0.001, 64, reference_loss=1.0)  # +2%: 0.5% old vocabulary, 1.5% new rows
    assert judge(promise, replace(moved, expected_rel_change=0.015), floor, 0.01, 64).passed
    assert not judge(promise, moved, floor, 0.01, 64).passed  # the same +2% without new rows is too much
    assert not judge(promise, replace(moved, expected_rel_change=0.005), floor, 0.01, 64).passed  # 1.5% on the old vocabulary


def test_hewitt_draws_are_reproducible_and_depend_on_the_seed():
    model = make_model(make_config("mistral"))
    ops = [{"op": "grow_vocab", "add_tokens": ["a", "b", "c"], "init": "hewitt"}]
    a = api.transform(model, ops, seed=0)[0].lm_head.weight[64:]
    b = api.transform(model, ops, seed=0)[0].lm_head.weight[64:]
    c = api.transform(model, ops, seed=1)[0].lm_head.weight[64:]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-stablelm", "tiny-mistral-hf"])
def test_three_tokens_on_builtin_models_encode_as_new_ids_with_old_logits_and_loss_kept(source, tmp_path, write_recipe):
    """The issue's acceptance: AutoTokenizer gives each new token one id >= the old vocabulary, old logits
    within 1e-4 of the source (checked here independently of surgery), loss moved by less than 2%."""
    out = tmp_path / "out"
    r = api.run(_recipe(write_recipe, f"builtin:{source}", [{"op": "grow_vocab", "add_tokens": TOKENS3, "init": "mean"}], out))
    assert r.report.passed, r.report.rule
    tok = AutoTokenizer.from_pretrained(str(out))
    old_tok = AutoTokenizer.from_pretrained(str(ASSETS / source))
    old_vocab = len(old_tok)
    ids = [tok(t if isinstance(t, str) else t["content"], add_special_tokens=False)["input_ids"] for t in TOKENS3]
    assert all(len(i) == 1 and i[0] >= old_vocab for i in ids) and len({i[0] for i in ids}) == 3
    assert tok.decode(ids[1] + ids[2], skip_special_tokens=True) == ""
    text = old_tok("The license allows you to copy, modify and distribute the software.", return_tensors="pt")["input_ids"]
    assert tok(old_tok.decode(text[0]), return_tensors="pt")["input_ids"].tolist() == text.tolist()
    src = AutoModelForCausalLM.from_pretrained(str(ASSETS / source), dtype=torch.float32)
    dst = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert dst.config.vocab_size == old_vocab + 3 == dst.get_output_embeddings().weight.shape[0]
    a, b = _logits(src, text), _logits(dst, text)
    assert (a - b[:, :old_vocab]).abs().max() <= 1e-4
    with torch.no_grad():
        la, lb = (float(m(input_ids=text, labels=text).loss) for m in (src, dst))
    assert abs(lb - la) / la < 0.02


def assert_three_tokens_added(config, tmp_path, write_recipe):
    """The issue's acceptance: old logits kept, loss moved < 2%, each new token one id from 512 on."""
    src = save_checkpoint(make_model(config, dtype=torch.float32), tmp_path / "src", "tiny-llama")
    out = tmp_path / "out"
    r = api.run(_recipe(write_recipe, str(src), [{"op": "grow_vocab", "add_tokens": TOKENS3, "init": "mean"}], out, max_tokens=256))
    assert r.report.passed, r.report.rule
    assert r.report.max_logit_diff <= 1e-4 and abs(r.report.rel_change) < 0.02
    tok = AutoTokenizer.from_pretrained(str(out))
    got = [tok(t if isinstance(t, str) else t["content"], add_special_tokens=False)["input_ids"] for t in TOKENS3]
    assert got == [[512], [513], [514]]


@pytest.mark.parametrize("family", FAMILIES)
def test_three_tokens_on_random_models_of_every_family_keep_old_logits_and_encode_as_new_ids(family, tmp_path, write_recipe):
    """Untrained models with random norms, biases and a non-zero embedding mean, tied and not."""
    tied = family in ("mistral", "stablelm")
    assert_three_tokens_added(make_config(family, vocab=512, tied=tied), tmp_path, write_recipe)


@pytest.mark.parametrize("family", sorted(getattr(factories, "RELEASES", {})))  # Qwen3, OLMo 2, Phi-3, Gemma 2/3 tables
def test_three_tokens_on_release_configs_of_the_newer_families(family, tmp_path, write_recipe):
    config = factories.release_config(family, vocab=512, tied=family.startswith("gemma"))
    assert_three_tokens_added(config, tmp_path, write_recipe)


def test_subword_rows_are_the_mean_of_the_pieces_rows(tmp_path, write_recipe):
    out = tmp_path / "out"
    words = ["surgeryword", "copyright"]
    api.run(_recipe(write_recipe, "builtin:tiny-llama", [{"op": "grow_vocab", "add_tokens": words, "init": "subword"}], out))
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tiny-llama"))
    with safe_open(str(ASSETS / "tiny-llama" / "model.safetensors"), "pt") as f, safe_open(str(out / "model.safetensors"), "pt") as g:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            old, new = f.get_tensor(name), g.get_tensor(name)
            for i, w in enumerate(words):
                pieces = tok(w, add_special_tokens=False)["input_ids"]
                assert len(pieces) > 1
                assert torch.allclose(new[512 + i], old[pieces].mean(0), atol=1e-6)


def test_a_tokenizer_shorter_than_the_model_gets_reserved_tokens_and_new_ids_after_the_old_rows(tmp_path, write_recipe):
    src = save_checkpoint(make_model(make_config("qwen2", vocab=600), dtype=torch.float32), tmp_path / "src", "tiny-llama")
    out = tmp_path / "out"
    ops = [{"op": "grow_vocab", "add_tokens": ["surgeryword"], "pad_to_multiple_of": 8}]
    r = api.run(_recipe(write_recipe, str(src), ops, out))
    assert r.report.passed, r.report.rule
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("surgeryword", add_special_tokens=False)["input_ids"] == [600]
    assert tok.convert_ids_to_tokens(599) == "<|surgery_reserved_599|>"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 608


def test_two_grow_vocab_ops_padding_between_them_give_each_token_its_planned_id(tmp_path, write_recipe):
    out = tmp_path / "out"
    ops = [{"op": "grow_vocab", "add_tokens": ["surgeryword"], "pad_to_multiple_of": 32},
           {"op": "grow_vocab", "add_tokens": [{"content": "<|im_end|>", "special": True}], "init": "zeros"}]
    r = api.run(_recipe(write_recipe, "builtin:tiny-stablelm", ops, out))
    assert r.report.passed, r.report.rule
    assert any("ids 513..543 become reserved" in n for n in r.plan.steps[1].promise.notes)
    from surgery.verify.schedule import schedule

    rule = schedule(r.plan).planned_rule()  # what `surgery plan` says verification will check
    assert "logits on the first 512 tokens" in rule and "33 new rows' share of the normaliser" in rule
    assert "each added token encodes" in rule
    tok = AutoTokenizer.from_pretrained(str(out))
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in ("surgeryword", "<|im_end|>")] == [[512], [544]]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 545


def test_grow_then_add_tokens_then_clone_width_is_verified_and_streams_each_tensor_once(tmp_path, write_recipe, monkeypatch):
    from surgery.io import checkpoint

    loads: dict[str, int] = {}
    writing = []
    real_read, real_write = checkpoint.read_tensor, api.write_output

    def counting(meta):
        if writing:  # reads while writing the output; per-op verification reads the source again, apart
            loads[str(meta.file) + str(meta.offset)] = loads.get(str(meta.file) + str(meta.offset), 0) + 1
        return real_read(meta)

    def write(*a, **k):
        writing.append(1)
        try:
            return real_write(*a, **k)
        finally:
            writing.clear()

    monkeypatch.setattr(checkpoint, "read_tensor", counting)
    monkeypatch.setattr(api, "write_output", write)
    out = tmp_path / "out"
    ops = [{"op": "grow_mlp", "intermediate_size": "x1.5"}, {"op": "grow_vocab", "add_tokens": TOKENS3, "pad_to_multiple_of": 16},
           {"op": "clone_width", "factor": 2}]
    r = api.run(_recipe(write_recipe, "builtin:tiny-mistral-hf", ops, out))
    assert r.report.passed, r.report.rule
    assert r.report.dead_slices == []
    assert loads and max(loads.values()) == 1  # every source tensor read once, the embedding included
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 528


def _refused(write_recipe, tmp_path, capsys, source: str, tokens: list) -> str:
    """The one error line `surgery run` gives for adding `tokens`, with nothing written."""
    out = tmp_path / "o"
    assert main(["run", str(_recipe(write_recipe, source, [{"op": "grow_vocab", "add_tokens": tokens}], out))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()
    return err


def _spm_ids(text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(ASSETS / "tiny-mistral" / "tokenizer.model")).encode(text)


@pytest.mark.parametrize("source,tokens,covered,piece", [
    ("tiny-llama", [" the", " Python"], " the", "Ġthe"),  # the issue: byte-level BPE holds " the" as Ġthe
    ("tiny-llama", [" Python"], " Python", "ĠPython"),
    ("tiny-llama", ["surgeryword", "the"], " the", "Ġthe"),  # without its space: every " the" would become Ġ + new id
    ("tiny-stablelm", [{"content": " the", "special": True}], " the", "Ġthe"),  # special tokens are matched in text too
    ("tiny-mistral", ["the"], "the", "▁the"),  # sentencepiece: the normaliser's ▁ prefix makes it match "▁the"
])
def test_a_token_the_source_tokenizer_already_has_as_one_id_is_refused_with_that_id(source, tokens, covered, piece,
                                                                                    tmp_path, write_recipe, capsys):
    """Added, such a token takes that text from its trained row to a new one: the old code called it exact
    while the grown tiny-llama tokenizer never emitted Ġthe again (loss 0.76 -> 1.30 on the license)."""
    i = next(i for i, t in enumerate(tokens) if (t if isinstance(t, str) else t["content"]).strip() == covered.strip())
    old = _spm_ids(covered) if source == "tiny-mistral" else \
        AutoTokenizer.from_pretrained(str(ASSETS / source))(covered, add_special_tokens=False)["input_ids"]
    assert len(old) == 1
    err = _refused(write_recipe, tmp_path, capsys, f"builtin:{source}", tokens)
    content = tokens[i] if isinstance(tokens[i], str) else tokens[i]["content"]
    assert f"ops.0.add_tokens.{i}: token {content!r} is already in the vocabulary" in err
    assert f"encodes {covered!r} as the one token {piece!r} (id {old[0]})" in err


@pytest.mark.parametrize("special", [False, True])
def test_a_token_inside_existing_words_is_refused_because_it_would_split_them(special, tmp_path, write_recipe, capsys):
    """Added tokens are matched anywhere in text (special ones too): "he" would cut every "the" apart."""
    err = _refused(write_recipe, tmp_path, capsys, "builtin:tiny-llama", ["surgeryword", {"content": "he", "special": special}])
    assert "ops.0.add_tokens.1: token 'he' would change how existing text is split" in err
    assert "cut the source's token 'Ġthe' (id 284) apart (in the Python license text)" in err


def test_a_token_that_would_not_be_its_own_id_is_refused_before_writing(tmp_path, write_recipe, capsys):
    """A non-special token is matched after the special ones, so one holding <|endoftext|> is never matched whole."""
    err = _refused(write_recipe, tmp_path, capsys, "builtin:tiny-llama", ["<|endoftext|>x"])
    assert "ops.0.add_tokens.0: token '<|endoftext|>x' would not be encoded as its new id 512" in err and "[0, 88]" in err


def test_accepted_tokens_leave_existing_text_encoded_as_before_and_its_float64_loss_moved_by_the_new_rows_only(
        tmp_path, write_recipe):
    """On the license text the grown tokenizer gives the source's ids; in float64 the old logits are the source's
    and the loss moved by exactly log(1 + the new rows' share of the normaliser), unchanged over the old vocabulary."""
    import torch.nn.functional as F

    from surgery.verify.data import license_text

    out = tmp_path / "out"
    tokens = ["surgeryword", {"content": "<|im_start|>", "special": True}, {"content": "<|im_end|>", "special": True}]
    r = api.run(_recipe(write_recipe, "builtin:tiny-llama", [{"op": "grow_vocab", "add_tokens": tokens}], out, max_tokens=256))
    assert r.report.passed, r.report.rule
    text = license_text()
    ids = AutoTokenizer.from_pretrained(str(ASSETS / "tiny-llama"))(text, add_special_tokens=False)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)["input_ids"] == ids
    ids = torch.tensor([ids[:512]])
    src, dst = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float64) for d in (ASSETS / "tiny-llama", out))
    a, b = _logits(src, ids), _logits(dst, ids)
    v = a.shape[-1]
    assert b.shape[-1] == v + 3 and (a - b[:, :v]).abs().max() <= 1e-12 * a.abs().max()

    def loss(logits):
        return float(F.cross_entropy(logits[:-1], ids[0, 1:]))

    mass = float((torch.logsumexp(b[:-1], -1) - torch.logsumexp(b[:-1, :v], -1)).mean())
    assert abs(loss(b[:, :v]) - loss(a)) <= 1e-12 * loss(a)
    assert 0 < mass and abs(loss(b) - loss(a) - mass) <= 1e-12 * loss(a)


def _old_split_kept(tok, token: str, texts: list[str]) -> bool:
    """Independently of surgery's offsets: the text around each match of `token` (leftmost, as tokenizers matches
    added tokens) encodes alone as in the whole text, the match itself takes two or more old tokens (with the one space
    byte-level BPE glues to a word), and no match is a single old token."""
    def enc(text):
        return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    for text in texts:
        parts = text.split(token)
        if len(parts) == 1:
            continue
        ids = []
        for p in parts[:-1]:
            space = " " if p.endswith(" ") else ""
            match = enc(space + token)
            if len(match) == 1:
                return False
            ids += enc(p[:len(p) - len(space)]) + match
        if ids + enc(parts[-1]) != enc(text):
            return False
    return True


LICENSE = (ASSETS / "python-license.txt").read_text()


def _license_pieces():
    text = LICENSE
    return st.integers(0, len(text) - 13).flatmap(lambda a: st.integers(1, 12).map(lambda n: text[a:a + n]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=st.one_of(_license_pieces(), st.text(st.sampled_from("abeilmnorstwyz0_-.,:<>|()AP é\n"), min_size=1, max_size=10)),
       special=st.booleans())
def test_a_token_is_refused_exactly_when_it_would_not_keep_the_old_split_of_existing_text(token, special):
    """Byte-level BPE without a normaliser: raw substring matches are how tokenizers matches added tokens."""
    import copy

    from surgery.io.grown_tokenizer import NewToken, split_changes

    tok = _tiny_llama_tokenizer()
    assume(not token[0].isspace() and token not in tok.get_vocab() and "<|endoftext|>" not in token)
    found = split_changes(copy.deepcopy(tok), [NewToken(token, special, 512)])
    event("refused" if found else "accepted")
    assert (not found) == _old_split_kept(tok, token, [token, " " + token, LICENSE]), found


@functools.cache
def _tiny_llama_tokenizer():
    from surgery.io.grown_tokenizer import load_tokenizer

    return load_tokenizer(ASSETS / "tiny-llama")


def test_a_tokenizers_panic_is_one_line_not_a_traceback(monkeypatch):
    from surgery.io import grown_tokenizer

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    calls = []

    def panics(tok, texts):
        calls.append(1)
        if len(calls) == 2:
            raise PanicException("AddedVocabulary bad split")
        return tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)

    monkeypatch.setattr(grown_tokenizer, "_encode", panics)
    found = grown_tokenizer.split_changes(grown_tokenizer.load_tokenizer(ASSETS / "tiny-llama"),
                                          [grown_tokenizer.NewToken("surgeryword", False, 512)])
    assert found == {0: "'surgeryword': tokenizers fails on text with it added (AddedVocabulary bad split)"}


def test_errors_are_one_line_with_where(tmp_path, write_recipe, capsys):
    cases = [
        ([{"op": "grow_vocab", "add_tokens": ["<|endoftext|>"]}], "ops.0.add_tokens.0: token '<|endoftext|>' is already in the vocabulary"),
        ([{"op": "grow_vocab", "add_tokens": ["x1", "x1"]}], "token 'x1' is listed twice"),
        ([{"op": "grow_vocab"}], "give add_tokens, pad_to_multiple_of, or both"),
        ([{"op": "grow_vocab", "add_tokens": [{"content": "x", "special": "maybe"}]}], "special"),
    ]
    for ops, message in cases:
        assert main(["run", str(_recipe(write_recipe, "builtin:tiny-llama", ops, tmp_path / "o"))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("init", ["mean", "hewitt", "subword", "zeros"])
def test_a_vocabulary_sized_bias_grows_with_its_rows(init):
    """No family here has an lm_head bias; the op grows any tensor with a vocabulary axis, biases too."""
    from surgery.ops.grow_vocab import VocabInit, VocabRows
    from surgery.ops.slices import append_dest, scatter_axis

    bias = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    rows = VocabRows("vocab", (0, 0, "b"), init=VocabInit(init), pieces=((1, 2), None, None))
    grown = scatter_axis(bias, 0, 13, torch.tensor(append_dest(10)), rows)
    assert grown.shape == (13,) and torch.equal(grown[:10], bias)
    want = {"mean": bias.mean(), "hewitt": bias.mean(), "subword": bias[[1, 2]].mean(), "zeros": 0.0}[init]
    assert torch.allclose(grown[10], torch.as_tensor(want, dtype=torch.float64), atol=1e-3 * float(bias.std()))


def test_subword_needs_a_tokenizer():
    with pytest.raises(SurgeryError, match="subword needs the source tokenizer"):
        api.transform(make_model(make_config("llama")), [{"op": "grow_vocab", "add_tokens": ["x"], "init": "subword"}])


def test_native_mistral_source_takes_normal_tokens_and_refuses_special_ones_and_native_output(tmp_path, write_recipe, capsys):
    out = tmp_path / "out"
    r = api.run(_recipe(write_recipe, "builtin:tiny-mistral", [{"op": "grow_vocab", "add_tokens": ["surgeryword"]}], out))
    assert r.report.passed, r.report.rule
    assert AutoTokenizer.from_pretrained(str(out))("surgeryword", add_special_tokens=False)["input_ids"] == [512]
    assert not (out / "tokenizer.model").exists()  # sentencepiece cannot hold it: no stale copy beside tokenizer.json
    special = [{"op": "grow_vocab", "add_tokens": [{"content": "[TOOL]", "special": True}]}]
    assert main(["run", str(_recipe(write_recipe, "builtin:tiny-mistral", special, tmp_path / "o2"))]) == 2
    assert "splits special tokens" in capsys.readouterr().err
    native = {"name": "v", "source": "builtin:tiny-mistral", "output": {"path": str(tmp_path / "o3"), "format": "mistral"},
              "ops": [{"op": "grow_vocab", "add_tokens": ["surgeryword"]}]}
    assert main(["run", str(write_recipe(json.dumps(native)))]) == 2
    assert "output.format: Mistral's native tokenizer.model" in capsys.readouterr().err


def test_a_native_release_with_only_its_tokenizer_model_gets_the_tokens_in_transformers_conversion(tmp_path, write_recipe):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("params.json", "consolidated.safetensors", "tokenizer.model"):
        shutil.copyfile(ASSETS / "tiny-mistral" / f, src / f)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    r = api.run(_recipe(write_recipe, str(src), [{"op": "grow_vocab", "add_tokens": ["surgeryword"], "init": "subword"}], out))
    assert r.report.passed, r.report.rule
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("surgeryword", add_special_tokens=False)["input_ids"] == [512]
    assert tok.chat_template == "{{ messages }}"
    assert not list(out.glob("tokenizer.model*"))


def test_native_output_padded_vocabulary_is_in_params_json(tmp_path, write_recipe):
    native = {"name": "v", "source": "builtin:tiny-mistral", "output": {"path": str(tmp_path / "o"), "format": "mistral"},
              "ops": [{"op": "grow_vocab", "pad_to_multiple_of": 96}], "verify": {"max_tokens": 256}}
    r = api.run(write_recipe(json.dumps(native)))
    assert r.report.passed, r.report.rule
    assert json.loads((tmp_path / "o" / "params.json").read_text())["vocab_size"] == 576


def test_a_sentencepiece_only_hf_source_gets_a_tokenizer_json_with_the_new_tokens(tmp_path, write_recipe):
    """No tokenizer.json and no protobuf: the tokenizer is built from sentencepiece's API, chat template kept."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(ASSETS / "tiny-mistral-hf" / f, src / f)
    shutil.copyfile(ASSETS / "tiny-mistral" / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "chat_template": "{{ x }}"}))
    out = tmp_path / "out"
    ops = [{"op": "grow_vocab", "add_tokens": ["surgeryword"], "init": "subword"}]
    assert main(["run", str(_recipe(write_recipe, str(src), ops, out)), "--no-verify"]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("surgeryword", add_special_tokens=False)["input_ids"] == [512]
    assert tok.chat_template == "{{ x }}"


def test_each_planned_state_keeps_the_added_tokens_and_source_rows_of_its_own_step(write_recipe, tmp_path):
    ops = [{"op": "grow_vocab", "add_tokens": ["surgeryword"]},
           {"op": "grow_vocab", "add_tokens": [{"content": "<|im_end|>", "special": True}], "pad_to_multiple_of": 16}]
    p = api.plan(_recipe(write_recipe, "builtin:tiny-mistral-hf", ops, tmp_path / "out"))
    metas = [s.spec.meta for s in p.states()]
    assert [[(t.content, t.special, t.id) for t in m.added_tokens] for m in metas] == [
        [], [("surgeryword", False, 512)], [("surgeryword", False, 512), ("<|im_end|>", True, 513)]]
    assert [m.source_vocab_size for m in metas] == [None, 512, 512]
    assert p.final.spec.copy().meta == p.final.spec.meta and p.final.spec.copy().meta.added_tokens is not metas[-1].added_tokens

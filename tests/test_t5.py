"""T5 (seed 004): reinit and inspect on T5ForConditionalGeneration checkpoints; growth refused in one line.

The tiny models mirror the two T5 layouts people start from: v1.1 (gated-gelu MLP wi_0/wi_1, untied
lm_head, config.json with tie_word_embeddings false) and v1.0 / t5-small (relu MLP wi, tied embeddings
that the 4.x config.json leaves to the class default).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from conftest import save_checkpoint
from surgery import api
from surgery.errors import SurgeryError
from surgery.inspect import inspect_checkpoint

VOCAB = 512
V1_1 = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_ff=96, d_kv=16, d_model=64,
            decoder_start_token_id=0, dropout_rate=0.0, eos_token_id=1, feed_forward_proj="gated-gelu", initializer_factor=1.0,
            is_encoder_decoder=True, layer_norm_epsilon=1e-06, num_decoder_layers=2, num_heads=4, num_layers=2, output_past=True,
            pad_token_id=0, relative_attention_num_buckets=32, tie_word_embeddings=False, vocab_size=VOCAB)
V1_0 = {k: v for k, v in V1_1.items() if k not in ("feed_forward_proj", "tie_word_embeddings")}  # relu, tied by default


def t5_dir(tmp_path, fields: dict, name: str = "t5"):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**fields)
    model = transformers.T5ForConditionalGeneration(cfg).eval()  # drawn by T5's own _init_weights
    path = save_checkpoint(model, tmp_path / name)
    raw = json.loads((path / "config.json").read_text())
    if "tie_word_embeddings" not in fields:
        raw.pop("tie_word_embeddings", None)  # as 4.x wrote t5-small's config
    (path / "config.json").write_text(json.dumps(raw))
    return path


def recipe(write_recipe, source, ops) -> str:
    import yaml

    return write_recipe(yaml.safe_dump({"name": "t5", "source": str(source), "ops": ops, "verify": {"max_tokens": 128}}))


def test_full_hf_reinit_of_t5_draws_lm_head_with_std_1_and_the_initial_loss_check_names_it(tmp_path, write_recipe):
    src = t5_dir(tmp_path, V1_1)
    result = api.run(recipe(write_recipe, src, [{"op": "reinit", "method": "hf"}]), output=str(tmp_path / "out"))
    assert not result.report.passed
    assert result.report.loss_output > 2 * math.log(VOCAB)
    assert "lm_head" in result.report.rule


def test_lm_head_inv_sqrt_d_with_the_rest_by_hf_starts_t5_near_ln_vocab(tmp_path, write_recipe):
    src = t5_dir(tmp_path, V1_1)
    # lm_head first: every re-initialised state is judged by its initial loss, and a body drawn by hf under
    # the std-1 head would fail (the test above)
    ops = [{"op": "reinit", "method": "lm_head_inv_sqrt_d", "targets": ["lm_head"]},
           {"op": "reinit", "method": "hf", "targets": ["attn", "attn.rel_bias", "mlp", "norm"]}]
    result = api.run(recipe(write_recipe, src, ops), output=str(tmp_path / "out"))
    assert result.report.passed, result.report.rule
    assert abs(result.report.loss_output - math.log(VOCAB)) / math.log(VOCAB) < 0.1
    model, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert abs(float(model.lm_head.weight.detach().std()) - 64 ** -0.5) / 64 ** -0.5 < 0.05


@pytest.mark.parametrize("fields", [V1_1, V1_0], ids=["v1.1-gated-untied", "v1.0-relu-tied"])
def test_inspect_explains_every_tensor_of_a_fresh_t5_by_its_own_init_rules(tmp_path, fields):
    result = inspect_checkpoint(t5_dir(tmp_path, fields), method="hf")
    norms = [s for s in result.stats if "layer_norm" in s.name]
    matrices = [s for s in result.stats if s not in norms]
    assert {s.name for s in matrices} >= {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                          "decoder.block.1.layer.1.EncDecAttention.q.weight"}
    for s in matrices:
        assert s.predicted is not None, s.name
        assert abs(s.ratio - 1) < 0.15, (s.name, s.std, s.predicted.describe())
    assert all(s.predicted.value == 1.0 for s in norms)


def test_t5_v1_0_config_without_tie_word_embeddings_is_tied_and_reinit_keeps_it_loadable(tmp_path, write_recipe):
    src = t5_dir(tmp_path, V1_0)
    result = api.run(recipe(write_recipe, src, [{"op": "reinit", "method": "normal", "targets": ["mlp"], "layers": "1"}]),
                     output=str(tmp_path / "out"))
    assert result.plan.initial.spec.tied
    model, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert result.report.loss_output <= 2 * math.log(VOCAB)


@pytest.mark.parametrize("op", [{"op": "grow_mlp", "intermediate_size": "x2"}, {"op": "grow_layers", "num_layers": 3},
                                {"op": "clone_width", "factor": 2}])
def test_growth_of_t5_is_refused_in_one_line_before_any_weight_is_read(tmp_path, write_recipe, op):
    src = t5_dir(tmp_path, V1_1)
    with pytest.raises(SurgeryError, match=f"{op['op']} is refused for t5: T5 is an encoder-decoder"):
        api.plan(recipe(write_recipe, src, [op]))


def test_a_stored_encoder_embedding_apart_from_shared_is_refused_since_the_table_ties_it(tmp_path, write_recipe):
    """transformers loads a differing stored copy apart; reading it tied would write another model."""
    from safetensors.torch import load_file, save_file

    src = t5_dir(tmp_path, V1_1)
    sd = load_file(src / "model.safetensors")
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match="'encoder.embed_tokens.weight' holds other values than 'shared.weight'"):
        api.plan(recipe(write_recipe, src, [{"op": "reinit", "method": "hf"}]))
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()  # a stored copy, as older saves hold: tied
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    api.plan(recipe(write_recipe, src, [{"op": "reinit", "method": "hf"}]))

"""Streamed (layer by layer) evaluation computes what the whole stock transformers model computes."""
import math
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import save_checkpoint
from factories import FAMILIES, make_config, make_model
from surgery import api
from surgery.execute import materialize
from surgery.verify.gradient_flow import dead_slices
from surgery.runtime import evaluation
from surgery.runtime.build import experts_kwargs, model_from_tensors
from surgery.runtime.evaluation import compare, evaluate
from surgery.runtime.sources import CheckpointSource, StateSource, model_source, open_source
from surgery.runtime.streamed import StreamedModel

CPU = torch.device("cpu")


def whole(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return float(out.loss), out.logits[0]


def streamed_logits(ev):
    w, b = ev.streamed.head_weights()
    return ev.streamed.logits(ev.hidden, w, b, 0, ev.vocab)


def oracle_compare(ref_logits, ref_loss, logits, loss):
    """The whole-model comparison the runner replaces: full logits in float64 at once."""
    v = ref_logits.shape[-1]
    a, b = ref_logits.double(), logits[..., :v].double()
    diff = (a - b).abs()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    gaps = a.gather(-1, top_a[:, None]) - a.gather(-1, top_b[:, None])
    return dict(rel_change=(loss - ref_loss) / abs(ref_loss), max_logit_diff=float(diff.max()), mean_logit_diff=float(diff.mean()),
                top1_agreement=float((top_a == top_b).double().mean()), kl_divergence=max(float(kl), 0.0),
                max_flip_gap=float(gaps.max()))


def config_for(family, data):
    kw = dict(hidden_heads=data.draw(st.sampled_from([2, 4])), head_dim=data.draw(st.sampled_from([4, 8])),
              layers=data.draw(st.integers(1, 3)), tied=data.draw(st.booleans()), vocab=data.draw(st.sampled_from([64, 96])))
    kw["kv_heads"] = data.draw(st.sampled_from([k for k in (1, 2, kw["hidden_heads"]) if kw["hidden_heads"] % k == 0]))
    if family == "stablelm":
        kw.update(qk_layernorm=data.draw(st.booleans()), parallel_residual=data.draw(st.booleans()))
    cfg = make_config(family, **kw)
    if family == "mistral":
        cfg.sliding_window = data.draw(st.sampled_from([4, 256]))  # 4: the window cuts into the 32 tokens
    if family == "qwen2" and data.draw(st.booleans()):
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 1
        cfg.layer_types = ["full_attention" if i < 1 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_evaluation_equals_the_whole_stock_model_for_every_family(family, data, monkeypatch):
    monkeypatch.setattr(evaluation, "CHUNK_BYTES", 8 * 32 * 7)  # 7 vocabulary rows per block: many blocks
    cfg = config_for(family, data)
    stored = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    model = make_model(cfg, seed=data.draw(st.integers(0, 99)), dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        model.to(stored).save_pretrained(tmp)  # a bf16 checkpoint, as most real ones are
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        loss, logits = whole(reloaded, ids)
        ev = evaluate(open_source(Path(tmp)), ids, CPU, torch.float32)
        got = streamed_logits(ev)
    assert abs(ev.loss - loss) <= 1e-6 * abs(loss)
    assert float((got - logits).abs().max()) <= 1e-5 * float(logits.abs().max())


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_comparison_equals_the_whole_model_comparison_block_by_block(tied, monkeypatch):
    monkeypatch.setattr(evaluation, "CHUNK_BYTES", 8 * 24 * 5)
    cfg = make_config("llama", tied=tied, vocab=61)
    a, b = make_model(cfg, seed=0), make_model(cfg, seed=1)
    with torch.no_grad():  # close enough that top-1 mostly agrees
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa + 0.3 * (pb - pa))
    ids = torch.randint(0, 61, (1, 24), generator=torch.Generator().manual_seed(2))
    (la, za), (lb, zb) = whole(a, ids), whole(b, ids)
    want = oracle_compare(za, la, zb, lb)
    ea = evaluate(model_source(a), ids, CPU, torch.float64, attn_implementation="eager")
    eb = evaluate(model_source(b), ids, CPU, torch.float64, attn_implementation="eager")
    got = compare(ea, eb)
    assert 0 < want["kl_divergence"] and want["top1_agreement"] < 1
    for k, v in want.items():  # transformers' loss is float32 whatever the model dtype: rel_change to ~1e-7
        assert math.isclose(getattr(got, k), v, rel_tol=1e-6, abs_tol=1e-6 if k == "rel_change" else 1e-12), k
    assert math.isclose(ea.loss, la, rel_tol=1e-6) and math.isclose(eb.loss, lb, rel_tol=1e-6)


def test_a_grown_vocabulary_is_compared_on_the_reference_tokens():
    a = make_model(make_config("qwen2", vocab=64), seed=0)
    b = make_model(make_config("qwen2", vocab=80), seed=0)
    with torch.no_grad():  # b is a with 16 more tokens
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            pb[: pa.shape[0]] = pa
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    (la, za), (lb, zb) = whole(a, ids), whole(b, ids)
    got = compare(evaluate(model_source(a), ids, CPU, torch.float64), evaluate(model_source(b), ids, CPU, torch.float64))
    want = oracle_compare(za, la, zb, lb)
    assert got.compared_vocab == 64 and got.max_logit_diff <= 1e-12 and want["max_logit_diff"] <= 1e-12
    assert math.isclose(got.loss, lb, rel_tol=1e-6)


def test_each_tensor_is_read_once_and_one_layer_at_a_time():
    model = make_model(make_config("mistral", layers=3), dtype=torch.float32)
    src = model_source(model)
    reads: list[str] = []
    load = src.load
    src.load = lambda name, device, dtype: reads.append(name) or load(name, device, dtype)
    blocks: dict[str, list] = {}  # the head: read in blocks of vocabulary rows, each row once
    load_rows = src.load_rows
    src.load_rows = lambda name, a, b, device, dtype: blocks.setdefault(name, []).append((a, b)) or load_rows(name, a, b,
                                                                                                          device, dtype)
    evaluate(src, torch.arange(10)[None], CPU, torch.float32)
    assert sorted(reads + list(blocks)) == sorted(src.names())
    for name, spans in blocks.items():
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == src.rows(name)[0]
    layer_of = [int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)


def test_a_plan_step_evaluated_from_the_lazy_graph_equals_the_materialised_model(tmp_path):
    model = make_model(make_config("stablelm", qk_layernorm=True, kv_heads=4), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "src")
    p = api.plan("stablelm_grow", source=str(src))
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    for step in p.steps:
        whole_model = model_from_tensors(step.state.spec.config, materialize(step.state, p.checkpoint, CPU, torch.float32),
                                         torch.float32, CPU)
        loss, logits = whole(whole_model, ids)
        ev = evaluate(StateSource(step.state, p.checkpoint), ids, CPU, torch.float32)
        assert abs(ev.loss - loss) <= 1e-6 * loss and torch.allclose(streamed_logits(ev), logits, rtol=0, atol=1e-5)


def test_a_patched_layernorm_output_runs_its_shipped_norm_when_streamed(tmp_path):
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "o"), verify=False)
    from surgery.modeling.modeling_surgery import SurgeryStableLmForCausalLM

    patched = SurgeryStableLmForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    loss, logits = whole(patched, ids)
    ev = evaluate(open_source(tmp_path / "o"), ids, CPU, torch.float32)
    assert abs(ev.loss - loss) <= 1e-6 * loss and torch.allclose(streamed_logits(ev), logits, rtol=0, atol=1e-5)


def test_a_checkpoint_missing_a_layer_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from surgery.errors import SurgeryError

    model = make_model(make_config("llama"), dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / "m")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match="missing keys: model.layers.1.mlp.up_proj.weight"):
        evaluate(open_source(path), torch.arange(8)[None], CPU, torch.float32)


def global_dead(model, ids, slices, lr=1e-3):
    """The whole-model two-step check the layer-local one replaces (the oracle)."""
    params = dict(model.named_parameters())

    def dead_units():
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=ids, labels=ids).loss.backward()
        out = {}
        for i, s in enumerate(slices):
            g = params[s.tensor].grad
            g = g.index_select(s.axis, torch.tensor(s.index)).abs()
            other = [d for d in range(g.dim()) if d != s.axis]
            n = int(((g.amax(dim=other) if other else g) == 0).sum())
            if n:
                out[i] = n
        return out

    dead = dead_units()
    if dead:
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= lr * p.grad
        dead = {i: n for i, n in dead_units().items() if i in dead}
    return {slices[i].tensor: n for i, n in dead.items()}


OPS = [
    [{"op": "grow_mlp", "intermediate_size": "x2"}],
    [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}],
    [{"op": "grow_layers", "num_layers": 3}, {"op": "grow_mlp", "intermediate_size": "+8"}],
]


@pytest.mark.parametrize("family", ["llama", "stablelm"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("ops", range(len(OPS)))
def test_layer_local_gradient_check_agrees_with_the_whole_model_backward(family, tied, ops):
    model = make_model(make_config(family, tied=tied), dtype=torch.float32)
    grown, plan = api.transform(model, OPS[ops])
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(6))
    slices = plan.final.new_slices
    local = {d.tensor: d.dead for d in dead_slices(grown, ids, slices)}
    assert slices and local == global_dead(grown, ids, slices) == {}
    with torch.no_grad():  # kill the new units on both sides: values and writers, gate and down
        for layer in grown.model.layers:
            layer.mlp.up_proj.weight[model.config.intermediate_size:] = 0
            layer.mlp.gate_proj.weight[model.config.intermediate_size:] = 0
    if ops != 1:
        local = {d.tensor: d.dead for d in dead_slices(grown, ids, slices)}
        assert local and local == global_dead(grown, ids, slices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine; runs where one is lent")
def test_layers_stream_through_the_gpu_and_agree_with_the_cpu():
    model = make_model(make_config("qwen2", tied=True), dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(7))
    cpu = evaluate(model_source(model), ids, CPU, torch.float32)
    gpu = evaluate(model_source(model), ids, torch.device("cuda"), torch.float32)
    assert gpu.hidden.device.type == "cuda" and math.isclose(gpu.loss, cpu.loss, rel_tol=1e-5)
    assert compare(cpu, gpu).max_logit_diff < 1e-4


def test_a_tensor_whose_shape_disagrees_with_the_config_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from surgery.errors import SurgeryError

    path = save_checkpoint(make_model(make_config("qwen2"), dtype=torch.float32), tmp_path / "m")
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"][:-1].clone()
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match="'model.norm.weight' has shape"):
        evaluate(open_source(path), torch.arange(8)[None], CPU, torch.float32)


@pytest.mark.parametrize("family", sorted(__import__("factories").RELEASES))
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_evaluation_equals_the_whole_model_for_the_families_added_as_data(family, tied, tmp_path, monkeypatch):
    """Qwen3, OLMo 2, Phi-3 (fused qkv), Gemma 2 (final logit soft-capping) and Gemma 3 (sliding and
    global layers, scaled embedding) stream with no code of their own, from a bf16 checkpoint."""
    from factories import release_config

    monkeypatch.setattr(evaluation, "CHUNK_BYTES", 8 * 32 * 7)
    model = make_model(release_config(family, tied=tied), seed=3, dtype=torch.float32)
    ids = torch.randint(3, 64, (1, 32), generator=torch.Generator().manual_seed(8))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    loss, logits = whole(reloaded, ids)
    ev = evaluate(open_source(tmp_path), ids, CPU, torch.float32)
    assert abs(ev.loss - loss) <= 1e-6 * abs(loss)
    assert float((streamed_logits(ev) - logits).abs().max()) <= 1e-5 * float(logits.abs().max())


def moe_config(family, experts, top_k, tied, layers):
    common = dict(vocab_size=64, hidden_size=16, head_dim=4, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=layers, num_experts_per_tok=top_k, tie_word_embeddings=tied, max_position_embeddings=64)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=12, num_local_experts=experts, **common)
    if family == "qwen2_moe":  # with a shared expert and its gate
        return transformers.Qwen2MoeConfig(intermediate_size=12, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                                           num_experts=experts, norm_topk_prob=False, **common)
    return transformers.Qwen3MoeConfig(intermediate_size=12, moe_intermediate_size=8, num_experts=experts,
                                       norm_topk_prob=True, **common)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@settings(max_examples=3, deadline=None)
@given(experts=st.sampled_from([3, 11]), top_k=st.integers(1, 2), tied=st.booleans(), layers=st.integers(1, 2),
       stored=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_streamed_evaluation_fuses_each_layers_experts_as_transformers_loads_them(family, experts, top_k, tied, layers,
                                                                                 stored, seed):
    """Per-expert checkpoint tensors (more than 10 experts: index order, not string order) are fused
    layer by layer and the streamed model computes what the whole stock model loaded from disk computes."""
    cfg = moe_config(family, experts, top_k, tied, layers)
    model = make_model(cfg, seed=seed, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        model.to(stored).save_pretrained(tmp)
        assert any(".experts.1." in n for n in open_source(Path(tmp)).names())  # stored per expert
        for dtype in (torch.float32, torch.float64):
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **experts_kwargs(cfg, dtype)).eval()
            loss, logits = whole(reloaded, ids)
            ev = evaluate(open_source(Path(tmp)), ids, CPU, dtype)
            assert isinstance(ev.streamed, StreamedModel)
            assert abs(ev.loss - loss) <= 1e-6 * abs(loss)
            eps = torch.finfo(dtype).eps
            assert float((streamed_logits(ev) - logits).abs().max()) <= 64 * eps * float(logits.abs().max())

"""The gradient-flow check: new units made trainable get gradient; true saddles are reported dead."""
import torch

from factories import make_config, make_model
from surgery import api
from surgery.verify import dead_slices

IDS = torch.randint(0, 48, (1, 24), generator=torch.Generator().manual_seed(0))


def test_trainable_growth_of_a_tied_model_has_no_dead_slices():
    model = make_model(make_config("mistral", tied=True), dtype=torch.float32)
    grown, plan = api.transform(model, [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}])
    assert plan.final.new_slices
    assert dead_slices(grown, IDS, plan.final.new_slices) == []


def test_heads_whose_values_are_zero_are_reported_dead():
    model = make_model(make_config("llama", hidden_heads=2, kv_heads=2, head_dim=8), dtype=torch.float32)
    grown, plan = api.transform(model, [{"op": "grow_heads", "num_heads": 4, "num_kv_heads": 4, "residual": "keep"}])
    with torch.no_grad():
        for layer in grown.model.layers:
            layer.self_attn.v_proj.weight[16:] = 0  # zero on both sides: values and o_proj columns
            layer.self_attn.v_proj.bias[16:] = 0
    dead = dead_slices(grown, IDS, plan.final.new_slices)
    assert {d["tensor"] for d in dead} == {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)}
    assert all(d["dead"] == d["of"] == 16 for d in dead)


def test_dead_check_leaves_the_weights_unchanged():
    model = make_model(make_config("mistral", tied=True), dtype=torch.float32)
    grown, plan = api.transform(model, [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}])
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    dead_slices(grown, IDS, plan.final.new_slices)
    assert all(torch.equal(before[k], v) for k, v in grown.state_dict().items())


def test_moe_layers_are_checked_one_at_a_time_per_stored_expert_and_a_dead_expert_slice_is_named():
    """Experts fused in memory, slices named per stored expert tensor: the streamed check maps between them."""
    from surgery.runner import disk_layout, model_from_tensors

    model = make_model(make_config("mistral", intermediate=16), dtype=torch.float32)
    moe, plan = api.transform(model, [{"op": "grow_mlp", "intermediate_size": "x2"}, {"op": "upcycle_moe", "num_experts": 4}])
    slices = plan.final.new_slices
    assert {s.tensor for s in slices} >= {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)}
    ids = torch.randint(0, 48, (1, 128), generator=torch.Generator().manual_seed(0))  # every expert gets tokens
    assert dead_slices(moe, ids, slices) == []
    tensors = disk_layout(moe, dict(moe.state_dict()))
    new = next(s for s in slices if s.tensor == "model.layers.1.block_sparse_moe.experts.2.w2.weight").index
    for w in ("w1", "w3"):  # expert 2's new neurons in layer 1 read nothing: their down columns never learn
        tensors[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"][new] = 0
    broken = model_from_tensors(moe.config.to_dict(), tensors, torch.float32, torch.device("cpu"))
    dead = dead_slices(broken, ids, slices)
    assert [(d["tensor"], d["dead"]) for d in dead] == [("model.layers.1.block_sparse_moe.experts.2.w2.weight", len(new))]


def test_the_moe_gradient_check_runs_on_enough_tokens_for_every_expert_to_expect_sixteen(tmp_path):
    from surgery.verify import gradient_tokens

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: builtin:tiny-llama\nops:\n  - op: upcycle_moe\n    num_experts: 32\n    top_k: 2\n")
    plan = api.plan(recipe)
    assert gradient_tokens(plan.initial.spec) == 128 and gradient_tokens(plan.final.spec) == 256

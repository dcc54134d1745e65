"""The gradient-flow check: new units made trainable get gradient; true saddles are reported dead."""
import pytest
import torch

from factories import make_config, make_model
from surgery import api
from surgery.verify.gradient_flow import dead_slices

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
    assert {d.tensor for d in dead} == {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)}
    assert all(d.dead == d.of == 16 for d in dead)


def test_dead_check_leaves_the_weights_unchanged():
    model = make_model(make_config("mistral", tied=True), dtype=torch.float32)
    grown, plan = api.transform(model, [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}])
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    dead_slices(grown, IDS, plan.final.new_slices)
    assert all(torch.equal(before[k], v) for k, v in grown.state_dict().items())


def test_moe_layers_are_checked_one_at_a_time_per_stored_expert_and_a_dead_expert_slice_is_named():
    """Experts fused in memory, slices named per stored expert tensor: the streamed check maps between them."""
    from surgery.runtime.build import disk_layout, model_from_tensors

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
    assert [(d.tensor, d.dead) for d in dead] == [("model.layers.1.block_sparse_moe.experts.2.w2.weight", len(new))]


def test_the_moe_gradient_check_runs_on_enough_tokens_for_every_expert_to_expect_sixteen(tmp_path):
    from surgery.verify.schedule import gradient_tokens

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: builtin:tiny-llama\nops:\n  - op: upcycle_moe\n    num_experts: 32\n    top_k: 2\n")
    plan = api.plan(recipe)
    assert gradient_tokens(plan.initial.spec) == 128 and gradient_tokens(plan.final.spec) == 256


# ------------------------------------------------------------ experts no token of the batch is routed to
def routed_experts(model, ids) -> list[set[int]]:
    """Per layer, the experts the stock router sends some token of `ids` to."""
    seen = [set() for _ in model.model.layers]
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen[i].update(out[2].flatten().tolist()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def top1_upcycle(router="random", family="llama", **up):
    """grow_mlp then 8 experts, top-1 unless `up` says otherwise."""
    model = make_model(make_config(family, intermediate=16, qkv_bias=family != "llama"), dtype=torch.float32)
    return api.transform(model, [{"op": "grow_mlp", "intermediate_size": "x2"},
                                 {"op": "upcycle_moe", "num_experts": 8, "top_k": 1, "router": router, **up}])


def unreached(moe, ids) -> tuple[int, int]:
    """A (layer, expert) no token of `ids` is routed to."""
    seen = routed_experts(moe, ids)
    layer, expert = next((i, e) for i, s in enumerate(seen) for e in range(8) if e not in s)
    return layer, expert


def mutated(moe, change):
    from surgery.runtime.build import disk_layout, model_from_tensors

    tensors = disk_layout(moe, dict(moe.state_dict()))
    change(tensors)
    return model_from_tensors(moe.config.to_dict(), tensors, torch.float32, torch.device("cpu"))


MOE_IDS = torch.randint(0, 48, (1, 128), generator=torch.Generator().manual_seed(0))


def test_an_expert_no_token_reaches_is_alive_when_an_input_routes_to_it():
    """Top-1 of 8 experts with a random router: the batch leaves an expert without tokens, yet other inputs reach it."""
    moe, plan = top1_upcycle()
    unreached(moe, MOE_IDS)  # the batch leaves one out
    assert dead_slices(moe, MOE_IDS, plan.final.new_slices) == []


def test_an_unreached_expert_whose_neurons_read_nothing_is_dead_once_routed_to():
    moe, plan = top1_upcycle()
    layer, e = unreached(moe, MOE_IDS)

    def kill(t):
        for w in ("w1", "w3"):  # zero on the reading side: its down_proj never sees an activation
            t[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"].zero_()

    dead = dead_slices(mutated(moe, kill), MOE_IDS, plan.final.new_slices)
    assert [(d.tensor, d.dead, d.of) for d in dead] == [
        (f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight", 16, 16)]


def test_an_expert_whose_router_row_can_never_win_is_dead():
    """Top-1 renormalised: a row between two others never leads, and gets no gradient (only rounding residue)."""
    moe, plan = top1_upcycle()
    layer, e = unreached(moe, MOE_IDS)
    a, b = [j for j in range(8) if j != e][:2]

    def bury(t):
        w = t[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        w[e] = (w[a] + w[b]) / 2

    dead = dead_slices(mutated(moe, bury), MOE_IDS, plan.final.new_slices)
    assert [(d.tensor, d.dead) for d in dead] == [(f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight", 16)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_zero_router_that_renormalises_is_a_fixed_point_and_the_experts_it_never_picks_are_dead(top_k):
    """Ties send every token to the same k experts, whose renormalised weights ignore the other logits and, the
    experts being copies, their own: no row ever learns (rounding leaves residues on them, not gradient)."""
    moe, plan = top1_upcycle("zeros", top_k=top_k)
    dead = dead_slices(moe, MOE_IDS, plan.final.new_slices)
    assert len(dead) == 2 * (8 - top_k) and all(d.dead == d.of for d in dead)


def test_a_zero_router_without_renormalisation_learns_so_every_expert_is_reachable_after_a_step():
    """Qwen2-MoE with norm_topk_prob: false (exact only with a zero router): the chosen weight is a softmax
    probability, so every row gets gradient through the normaliser and the ties break after one step."""
    moe, plan = top1_upcycle("zeros", family="qwen2", norm_topk_prob=False)
    assert len({e for s in routed_experts(moe, MOE_IDS) for e in s}) == 1
    assert dead_slices(moe, MOE_IDS, plan.final.new_slices) == []

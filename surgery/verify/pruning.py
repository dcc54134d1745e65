"""A prune beside the same prune with importance: random (its seeded baseline), as a report row."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..ops import OpContext
from ..report import PruningRow, RandomPrune
from .rules import relative

if TYPE_CHECKING:
    from ..runtime.evaluation import Comparison

MAX_REPORTED_SCORES = 200_000


def random_baseline(p, step) -> tuple:
    """The state (a `ModelState`) a prune step of plan `p` would leave with importance: random and the same sizes
    (its seeded baseline), and what that prune dropped."""
    pruning = step.promise.pruning
    op = type(step.op).model_validate(pruning.random_baseline)
    pos = p.steps.index(step)
    state = (p.steps[pos - 1].state if pos else p.initial).copy()
    promise = op.apply(state, OpContext(seed=p.loaded.recipe.seed, index=step.index, measure=True))
    return state, promise.pruning.dropped


def baseline_row(step, pruning, cmp: Comparison, base: Comparison | None, dropped: list | None, source_loss: float,
                 reference: str = "source") -> PruningRow:
    """A prune beside its random baseline (None: the prune is random, its own baseline), for the report. `rel_change`
    is against the source, as on every row; `rel_change_vs_reference` against `reference`, the state it pruned."""
    m = pruning.measurement.scores if pruning.measurement is not None else None
    return PruningRow(
        op_index=step.index, op=step.op.label(),
        importance=pruning.importance.value if pruning.importance else "listed",
        unit=pruning.unit, kept_per_layer=pruning.kept_per_layer, of=pruning.of,
        tokens=pruning.measurement.tokens if pruning.measurement is not None else 0,
        dropped=pruning.dropped,
        loss=cmp.loss, rel_change=relative(cmp.loss, source_loss), rel_change_vs_reference=cmp.rel_change,
        reference=reference, kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement,
        random=None if base is None else RandomPrune(
            loss=base.loss, rel_change=relative(base.loss, source_loss), rel_change_vs_reference=base.rel_change,
            kl_divergence=base.kl_divergence, top1_agreement=base.top1_agreement, max_logit_diff=base.max_logit_diff,
            dropped=dropped),
        beats_random=None if base is None else cmp.loss < base.loss,
        # every score for the plot, up to MAX_REPORTED_SCORES numbers (a 70B model's 2.3M neuron scores: per layer min/median/max)
        scores=m.tolist() if m is not None and m.numel() <= MAX_REPORTED_SCORES else None,
        score_summary=[[float(r.min()), float(r.median()), float(r.max())] for r in m] if m is not None and m.dim() == 2 else None,
    )

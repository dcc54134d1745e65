"""The rule a step was judged by, in a few words for the terminal table; the full rule stays in
surgery_report.md and surgery_report.json."""
from __future__ import annotations

import re

_LABELS = {"exact": "exact", "exact with shipped code": "exact, shipped code", "exact on the old tokens": "exact, old tokens",
           "approximate": "approx", "re-initialisation": "reinit", "pruned": "pruned"}
_NOISE = re.compile(r"\((\S+x) measured (.+?) noise\)")
_TOLERANCE = re.compile(r"\(tolerance ([^)]+)\)")
_PRUNE_BOUND = re.compile(r"^pruned: loss change measured, rel change <= ([^;]+);")


def short_rule(exactness: str, rule: str, passed: bool | None) -> str:
    """e.g. "exact: 2x float32 noise", "approx: tol 0.0001", "informational", "pruned: measured".

    Built from the rule's own text (`verify.judge` writes it), so it says what the rule says; an
    unfamiliar rule keeps its head (the text before its first colon)."""
    if passed is None:
        return "informational"
    label = _LABELS.get(exactness)
    if label is None:
        return rule.split(":", 1)[0]
    if exactness.startswith("exact"):
        m = _NOISE.search(rule)
        if m is None:
            return label
        noise = m.group(2).replace("written rope frequencies' float32", "rope").replace(" rounding", "")
        return f"{label}: {m.group(1)} {noise} noise"
    if exactness == "approximate":
        m = _TOLERANCE.search(rule)
        return f"{label}: tol {m.group(1)}" if m else label
    if exactness == "re-initialisation":
        return f"{label}: loss <= 2 ln(vocab)"
    m = _PRUNE_BOUND.search(rule)
    return f"{label}: rel change <= {m.group(1)}" if m else f"{label}: measured"

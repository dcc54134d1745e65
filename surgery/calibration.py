"""What ops that learn from activations read (importance, upcycle_moe's `router: hidden`): the source, the
calibration tokens, where to run; and routers clustered from hidden states.

Nothing runs while planning: the first router tensor written runs the model state before the op once on
the calibration tokens, one decoder layer at a time (`runtime.streamed.StreamedModel`, float32, on the run's
device), and keeps each layer's router rows (E x hidden), computed from that layer's MLP inputs while
the layer is in memory: a 70B model's routers need one layer and one layer's activations, not the model.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .errors import SurgeryError
from .lazy import generator
from .runtime.progress import QUIET
from .runtime.sources import StateSource
from .runtime.streamed import StreamedModel


def spherical_kmeans(x: torch.Tensor, k: int, seed: tuple, iters: int = 25) -> torch.Tensor:
    """k unit centroids of the rows of x (unit vectors), seeded k-means++ on cosine similarity."""
    g = generator(*seed)
    n = x.shape[0]
    centroids = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        sim = (x @ torch.stack(centroids).T).amax(dim=1)
        far = (1 - sim).clamp_min(0) ** 2
        pick = int(torch.multinomial(far, 1, generator=g)) if float(far.sum()) > 0 else int(torch.randint(n, (1,), generator=g))
        centroids.append(x[pick])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        for e in range(k):
            if float(new[e].norm()) == 0:  # an empty cluster takes the token least like any centroid
                new[e] = x[int((x @ c.T).amax(dim=1).argmin())]
        c = torch.nn.functional.normalize(new, dim=1)
    return c


def router_from_states(states: torch.Tensor, num_experts: int, seed: tuple) -> torch.Tensor:
    """Router rows from the MLP inputs of one layer (tokens x hidden): one cluster of tokens per expert.

    States are centred first (their common mean, large in real models, would make every row alike);
    row e is the unit centroid of cluster e over the RMS norm of the centred states, so logits are O(1).
    """
    x = states.double()
    if x.shape[0] < num_experts:
        raise SurgeryError(f"router: hidden needs at least {num_experts} calibration tokens, got {x.shape[0]}",
                           where="verify.data")
    centred = x - x.mean(dim=0)
    rms = float(centred.norm(dim=1).pow(2).mean().sqrt()) or 1.0
    c = spherical_kmeans(torch.nn.functional.normalize(centred, dim=1), num_experts, seed)
    return (c / rms).float()


class Calibration:
    """What ops that learn from data read: the source (`reader`), the calibration tokens (`tokens()` gives them
    when first asked), where to run."""

    def __init__(self, reader, tokens: Callable[[], torch.Tensor], device: torch.device | None = None, progress=None):
        self.reader, self._tokens, self._ids = reader, tokens, None
        self.device = device or torch.device("cpu")
        self.progress = progress or QUIET
        self._rows: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = self._tokens()
        return self._ids

    def hidden_routers(self, state, num_experts: int, seed: tuple) -> list[torch.Tensor]:
        """Each layer's router rows from what its MLP reads when `state`'s model runs on the calibration tokens."""
        sm = StreamedModel(StateSource(state, self.reader, "the model before upcycle_moe"), self.device, torch.float32)
        rows: dict[int, torch.Tensor] = {}

        def on_layer(i: int, layer, prefix: str) -> list:
            def hook(m, args):
                x = args[0].detach()
                rows[i] = router_from_states(x.reshape(-1, x.shape[-1]).cpu(), num_experts, (*seed, i))
            return [layer.mlp.register_forward_pre_hook(hook)]

        sm.on_layer = on_layer
        with self.progress.phase("router: hidden, clustering each layer's MLP inputs", total=len(sm.layers)) as (bar, summary):
            sm.hidden(self.ids(), bar)
            summary.append(f"{len(rows)} layers, {self.ids().shape[1]} tokens")
        return [rows[i] for i in range(len(rows))]

    def router_rows(self, state, key, layer: int, num_experts: int, seed: tuple) -> torch.Tensor:
        with self._lock:
            if (key, layer) not in self._rows:
                for i, rows in enumerate(self.hidden_routers(state, num_experts, seed)):
                    self._rows[(key, i)] = rows
            return self._rows[(key, layer)]

"""Computing a large tensor in blocks of rows, with the bits of computing it whole.

A vocabulary-sized tensor of a real model is a gigabyte or more in bfloat16 (Llama-3-8B's lm_head grown
x1.5 is 1.5 GB): holding it whole, let alone in float32 beside its source and a random draw, is most of a
run's memory. Where every output row (axis 0) is computed from the same rows of the inputs, plus
statistics of whole inputs (a random fill's std and mean), the executor computes and writes the tensor
BLOCK_BYTES of float32 at a time: the statistics first, block by block (`moments.std_mean_of`, the same
bits however the blocks cut), then each block of rows from its inputs' rows.

A node says how its rows are computed by its `LazyTensor.rows`, a `RowRule`; a graph is computed in
blocks only where every node has one (reads of stored tensors always do). The bits are those of
`lazy.evaluate`: the rules apply the same operations to each row that the whole computation applies.

Random draws are defined per row block of a fixed size so their bits depend on the seed and the shapes
only, not on the block size of the computation, the core count or the device: a draw of `shape` comes
in blocks of DRAW_VALUES values (`draw_rows(shape)` whole rows), block 0 from the seed itself (so a
tensor of at most DRAW_VALUES values draws what a single `torch.randn` drew before blocks existed),
block b from the seed and b (`randn_rows`).
"""
from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .lazy import LazyTensor, RowRule, generator

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch

# float32 bytes of output rows computed at a time; smaller tensors are computed whole. Below glibc's largest
# mmap threshold (32 MiB): a block's buffers are then reused from its heap, where 32 MiB ones were each mapped
# afresh and faulted in page by page (two threads growing an 8B MLP: 2.5 s of system time at 32 MiB, 0.6 s at 16).
BLOCK_BYTES = 16 << 20
ROW_THREADS = 2  # threads computing consecutive blocks of one tensor side by side (a block's draws are serial)
DRAW_VALUES = 1 << 20  # values per block of a random draw (a fixed part of the draw's definition)


def row_values(shape) -> int:
    return math.prod(shape[1:])


def draw_rows(shape) -> int:
    """Rows per block of a random draw of `shape`: DRAW_VALUES values, whole rows, at least one."""
    return max(1, DRAW_VALUES // max(1, row_values(shape)))


def randn_rows(shape, seed: tuple, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the standard normal float32 draw of a tensor of `shape` seeded by `seed`. Whole draw
    blocks are drawn straight into the result (`out=`: the bits of drawing them alone), not drawn and concatenated."""
    import torch

    shape = tuple(shape)
    per = draw_rows(shape)
    out = torch.empty((max(0, stop - start),) + shape[1:], dtype=torch.float32)
    for b in range(start // per, -(-stop // per)):
        lo, hi = b * per, min(shape[0], (b + 1) * per)
        g = generator(*seed) if b == 0 else generator(*seed, "row block", b)
        a, e = max(start, lo), min(stop, hi)
        if (a, e) == (lo, hi):
            torch.randn((hi - lo,) + shape[1:], generator=g, dtype=torch.float32, out=out[a - start:e - start])
        else:
            out[a - start:e - start] = torch.randn((hi - lo,) + shape[1:], generator=g, dtype=torch.float32)[a - lo:e - lo]
    return out


Fetch = Callable[[int, int, int], "torch.Tensor"]  # (input index, first row, end row) -> that input's rows
Blocks = Callable[[int], Iterator["torch.Tensor"]]  # input index -> its row blocks in order, computed afresh


class RowLocal(RowRule):
    """`node.fn` computes each output row from the same row of its inputs alone (elementwise arithmetic, copies)."""

    def rows(self, node, start, stop, fetch, stats):
        return node.fn(*[fetch(i, start, stop) for i in range(len(node.inputs))])


ROW_LOCAL = RowLocal()


def separable(node: LazyTensor) -> bool:
    """Whether every node of the graph has a row rule (reads always do) and at least one row axis."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if not n.shape or (n.fn is not None and n.rows is None):
            return False
        stack.extend(n.inputs)
    return True


def in_blocks(node: LazyTensor) -> bool:
    """Whether the executor computes `node` in row blocks: separable, and large enough to be worth it."""
    return node.numel * 4 > BLOCK_BYTES and separable(node)


def block_cost() -> int:
    """What computing a tensor in blocks holds at most (a block's chain of work on each of its threads), for the
    executor's budget."""
    return 4 * BLOCK_BYTES * ROW_THREADS


def in_order(tasks: list[Callable[[], object]], threads: int | None = None) -> Iterator:
    """The results of `tasks` in order, up to `threads` (ROW_THREADS) of them computed at once on threads of their
    own while the consumer takes the one before; a single task runs on the consumer's thread. torch releases the
    GIL in its kernels, so consecutive row blocks (each with its own draws, from its own generator) use as many
    cores; a consumer that stops early cancels the rest and waits for those already running."""
    threads = min(ROW_THREADS if threads is None else threads, len(tasks))
    tasks = iter(tasks)
    if threads <= 1:
        for task in tasks:
            yield task()
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="rows")
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(task))
            if len(pending) >= threads:
                break
        while pending:
            result = pending.popleft().result()
            task = next(tasks, None)
            if task is not None:
                pending.append(pool.submit(task))
            yield result
            del result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def block_rows(shape, align: int = 1) -> int:
    """Rows per block of a tensor of `shape`: BLOCK_BYTES of float32, a multiple of `align` where that fits, at least one."""
    rows = max(1, BLOCK_BYTES // (4 * max(1, row_values(shape))))
    return rows // align * align if rows >= align else rows


def has_rows(reader) -> bool:
    """Whether `reader.load_rows(name, start, stop)` reads a stored tensor's rows alone (wrappers pass it on)."""
    return bool(getattr(reader, "reads_rows", False))


class RowEvaluator:
    """Row blocks of one output tensor's graph, in one dtype on one device (`lazy.evaluate`'s, per block)."""

    def __init__(self, node: LazyTensor, reader, device, dtype):
        self.node, self.reader, self.device, self.dtype = node, reader, device, dtype
        self.stats: dict[int, object] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # blocks compute on several threads (`in_order`): a small tensor is read once
        self._order = _post_order(node)

    def prepare(self) -> None:
        """Compute every node's statistics, inputs' first (each pass reads its input block by block)."""
        for n in self._order:
            if n.fn is not None and id(n) not in self.stats:
                stored = n.rows.stored_statistics(n)
                self.stats[id(n)] = n.rows.statistics(n, lambda i, n=n, s=stored: self.blocks(n.inputs[i], stored=s))

    def rows(self, n: LazyTensor, start: int, stop: int, stored: bool = False) -> torch.Tensor:
        """Rows [start, stop) of `n` in this evaluator's dtype and device; a stored tensor's as stored if `stored`."""
        if n.fn is None:
            if has_rows(self.reader) and n.numel * 4 > BLOCK_BYTES:
                t = self.reader.load_rows(n.source, start, stop)
            else:  # a small tensor, or a reader of whole tensors only: read once for every pass, sliced
                with self._lock:
                    if n.source not in self._whole:
                        self._whole[n.source] = (self.reader.load_rows(n.source, 0, n.shape[0]) if has_rows(self.reader)
                                                 else self.reader.load(n.source))
                t = self._whole[n.source][start:stop]
            t = t if stored else t.to(device=self.device, dtype=self.dtype)
        else:
            t = n.rows.rows(n, start, stop, lambda i, a, b: self.rows(n.inputs[i], a, b), self.stats.get(id(n)))
            t = t.to(device=self.device, dtype=self.dtype) if t.is_floating_point() else t.to(self.device)
        want = (stop - start,) + tuple(n.shape[1:])
        if tuple(t.shape) != want:
            raise AssertionError(f"{n.label}: computed rows {tuple(t.shape)} != planned {want}")
        return t

    def blocks(self, n: LazyTensor | None = None, stored: bool = False, then: Callable | None = None) -> Iterator:
        """`n`'s row blocks in order, computed ROW_THREADS at a time (`in_order`); `then(block)` on the same threads."""
        n = self.node if n is None else n
        step = block_rows(n.shape, max((m.rows.align(m) for m in _post_order(n) if m.fn is not None), default=1))
        spans = [(a, min(n.shape[0], a + step)) for a in range(0, n.shape[0], step)]
        then = then or (lambda t: t)
        return in_order([lambda a=a, b=b: then(self.rows(n, a, b, stored)) for a, b in spans])


def _post_order(node: LazyTensor) -> list[LazyTensor]:
    out, seen = [], set()

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        for i in n.inputs:
            visit(i)
        out.append(n)

    visit(node)
    return out


def byte_blocks(node: LazyTensor, reader, device, dtype, out_dtype) -> Iterator[tuple[int, memoryview]]:
    """(byte offset in the tensor, bytes) of `node` in `out_dtype`, computed in `dtype` block by block.
    Statistics are computed now, then the blocks, rounded to `out_dtype` on the threads that compute them (one thread
    rounding every block was the slowest step of a clone), one ahead of the writer (`ahead`)."""
    ev = RowEvaluator(node, reader, device, dtype)
    ev.prepare()
    return ahead(_as_bytes(ev.blocks(then=lambda t: stored_as(t, out_dtype)), out_dtype))


def stored_as(t: torch.Tensor, dtype) -> torch.Tensor:
    """A computed block as it is written: floating values rounded to `dtype`, on the CPU, contiguous."""
    return (t.to(dtype=dtype) if t.is_floating_point() else t).to("cpu").contiguous()


class ahead:
    """`items` produced on a thread of their own from now on, up to `depth` ahead of the consumer: a tensor's
    blocks are computed while earlier tensors and its own earlier blocks are written. Its errors reach the
    consumer; a consumer that stops early, or drops it unread, stops it."""

    def __init__(self, items: Iterator, depth: int = 1):
        import queue

        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():  # holds no reference to self: dropping the consumer's side stops it (`__del__`)
            try:
                for x in items:
                    if not put((True, x)):
                        return
                put((False, None))
            except BaseException as e:  # handed to the consumer, raised there
                put((False, e))

        self._q, self._stop = q, stop
        self._worker = threading.Thread(target=produce, name="rows", daemon=True)
        self._worker.start()

    def __iter__(self) -> Iterator:
        try:
            while True:
                more, x = self._q.get()
                if not more:
                    if x is not None:
                        raise x
                    return
                yield x
                del x
        finally:
            self._stop.set()
            self._worker.join()

    def __del__(self):
        self._stop.set()


def _as_bytes(blocks: Iterator[torch.Tensor], out_dtype):
    import torch

    at = 0
    for t in blocks:
        t = stored_as(t, out_dtype).reshape(-1)
        yield at, memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        at += t.numel() * out_dtype.itemsize


def placed(blocks: Iterable[torch.Tensor], runs: Iterable[tuple[int, int, int]], out_dtype) -> Iterator[tuple[int, memoryview]]:
    """(byte offset in the output, bytes) of consecutive blocks of a tensor's values in `out_dtype`, cut into
    `runs`: (first value, byte offset in the output, values), ascending. One block is held at a time."""
    import torch

    runs = iter(runs)
    run, lo, size = next(runs, None), 0, out_dtype.itemsize
    for t in blocks:
        t = t.to(dtype=out_dtype).to("cpu").contiguous().reshape(-1)
        flat = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        hi = lo + t.numel()
        while run is not None and run[0] < hi:
            first, at, n = run
            a, b = max(first, lo), min(first + n, hi)
            yield at + (a - first) * size, flat[(a - lo) * size:(b - lo) * size]
            if first + n > hi:
                break
            run = next(runs, None)
        lo = hi


class Sequential:
    """A reader's row reads of one tensor, hashed in order: the first pass from row 0 to the end gives the
    tensor's digest without holding it whole. Blocks computed side by side (`in_order`) read a little out of
    order: rows read ahead of the next expected one wait (up to AHEAD reads) until the rows before them come;
    rows read again, or further ahead, are not hashed (a whole load hashes the tensor)."""

    AHEAD = 4

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, tuple[object, int, dict]] = {}  # name -> (hasher, next row, reads ahead by first row)

    def feed(self, name: str, start: int, stop: int, rows: int, t: torch.Tensor, new_hasher) -> str | None:
        """The digest once rows [0, rows) have all been fed in order, else None."""
        with self._lock:
            h, at, ahead_of = self._open.get(name, (None, 0, {}))
            if start > at and len(ahead_of) < self.AHEAD:
                ahead_of.setdefault(start, (stop, t))
                self._open[name] = (h, at, ahead_of)
            if start != at:
                return None
            h = h or new_hasher()
            while True:
                _update(h, t)
                at = stop
                for first in [first for first in ahead_of if first < at]:  # read again after all: not needed
                    del ahead_of[first]
                if at >= rows:
                    self._open.pop(name, None)
                    return h.hexdigest()
                if at not in ahead_of:
                    self._open[name] = (h, at, ahead_of)
                    return None
                stop, t = ahead_of.pop(at)


def _update(h, t: torch.Tensor) -> None:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    if data.numel():
        import torch

        h.update(data.view(torch.uint8).numpy())

"""CUDA graphs for MambaLM's forward: the model's ~10 kernel launches per block cost more host time
than the GPU needs for them at evaluation batch sizes, so a forward of a shape seen before is
replayed from a captured graph instead of launched op by op.

Works with every mode and with the recorder: the fused kernels accumulate the statistics into the
recorder's tensors from inside the graph. A forward whose observers want values (the recorder's
snapshot batch) runs eagerly, as does anything not on CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch


class GraphedForward:
    """Call as ``model(input_ids, mask)``; returns logits.

    The logits of a replayed forward live in the graph's memory and are overwritten by the next
    call: use (or copy) them before calling again. A shape is captured the `capture_after`-th time
    it is seen (earlier sightings run eagerly), so that one-off shapes never pay for a capture;
    at most `max_graphs` graphs are kept, least recently used first out. Callers that pad lengths
    to a few sizes get the most replays.
    """

    def __init__(self, model, capture_after: int = 2, max_graphs: int = 16):
        self.model = model
        self.capture_after, self.max_graphs = capture_after, max_graphs
        self._graphs: OrderedDict = OrderedDict()
        self._seen: dict = {}
        self._pool = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not input_ids.is_cuda or self._snapshot_pending():
            return self.model(input_ids, mask=mask)
        key = self._key(input_ids, mask)
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.capture_after:
                return self.model(input_ids, mask=mask)
            graph = self._capture(key, input_ids, mask)
        self._graphs.move_to_end(key)
        return graph.replay(input_ids, mask)

    def _snapshot_pending(self) -> bool:
        recorder = self.model.recorder
        return recorder is not None and recorder.armed

    def _key(self, input_ids, mask):
        model = self.model
        return (
            tuple(input_ids.shape),
            None if mask is None else mask.dtype,
            model.spec,
            id(model.scales),
            id(model.recorder),
        )

    def _capture(self, key, input_ids, mask) -> "_Graph":
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = _Graph(self.model, input_ids, mask, self._pool)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


class _Graph:
    """One captured forward with its static input buffers."""

    def __init__(self, model, input_ids, mask, pool):
        self.ids = input_ids.clone()
        self.mask = None if mask is None else mask.clone()
        with _statistics_kept(model.recorder):
            # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(self.ids, mask=self.mask)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = model(self.ids, mask=self.mask)

    def replay(self, input_ids, mask):
        self.ids.copy_(input_ids)
        if mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


class _statistics_kept:
    """The warm-up forward must not count in the recorder's statistics: put them back after it."""

    def __init__(self, recorder):
        self.recorder = recorder

    def __enter__(self):
        if self.recorder is not None:
            self.saved = (self.recorder.sums.clone(), self.recorder.maxes.clone())

    def __exit__(self, *exc):
        if self.recorder is not None:
            self.recorder.sums.copy_(self.saved[0])
            self.recorder.maxes.copy_(self.saved[1])
        return False

"""CUDA graphs for MambaLM's forward: the model's ~10 kernel launches per block cost more host time
than the GPU needs for them at evaluation batch sizes, so a forward of a shape seen before is
replayed from a captured graph instead of launched op by op. The lm-eval model (`lm_model`)
runs its loglikelihood forwards through it.

Works with every mode and with the recorder: the fused kernels accumulate the statistics into the
recorder's tensors from inside the graph. A forward whose observers want values (the recorder's
snapshot batch) runs eagerly, as does anything not on CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F


class GraphedForward:
    """Call as ``forward(input_ids, mask)``; returns the logits ``model(input_ids, mask=mask)`` returns.

    On CUDA a forward replays a captured graph of the model up to its final hidden states;
    lm_head runs outside it, so the logits are a new tensor each call and graphs keep only small
    buffers. Lengths are padded on the right to `bucket_length` (padding masked out), so that
    batches of nearby lengths share a graph: the model is causal, so a real position sees
    nothing that follows it, and the recorder counts only unmasked positions. A padded batch
    runs its matmuls with more rows, which may sum in another order: its logits can differ
    from the unpadded forward's in the last bits, as a different batch size's can.

    A shape is captured the `capture_after`-th time it is seen (earlier sightings run eagerly
    and unpadded), so that one-off shapes never pay for a capture; at most `max_graphs` graphs
    are kept, least recently used first out. A capture that runs out of GPU memory (a batch size
    probed to fill it eagerly leaves no room for a graph's own pool) leaves that shape eager.
    """

    def __init__(self, model, capture_after: int = 2, max_graphs: int = 16):
        self.model = model
        self.capture_after, self.max_graphs = capture_after, max_graphs
        self._graphs: OrderedDict = OrderedDict()
        self._seen: dict = {}
        self._eager_only: set = set()
        self._pool = None

    def reset(self) -> None:
        """Drop every graph (they hold the recorder, scales and mode they were captured with)."""
        self._graphs.clear()
        self._seen.clear()
        self._eager_only.clear()
        self._pool = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self._can_graph(input_ids) or self._snapshot_pending():
            return self.model(input_ids, mask=mask)
        ids, padded_mask = _pad_to_bucket(input_ids, mask)
        key = self._key(ids, padded_mask)
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.capture_after or key in self._eager_only:
                return self.model(input_ids, mask=mask)
            graph = self._capture(key, ids, padded_mask)
            if graph is None:
                return self.model(input_ids, mask=mask)
        self._graphs.move_to_end(key)
        hidden = graph.replay(ids, padded_mask)
        return self.model.lm_head(hidden[:, : input_ids.shape[1]])

    @staticmethod
    def _can_graph(input_ids: torch.Tensor) -> bool:
        return input_ids.is_cuda

    def _snapshot_pending(self) -> bool:
        recorder = self.model.recorder
        return recorder is not None and recorder.armed

    def _key(self, ids, mask):
        model = self.model
        return (tuple(ids.shape), mask.dtype, model.spec, id(model.scales), id(model.recorder))

    def _capture(self, key, ids, mask) -> Optional["_Graph"]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = _Graph(self.model, ids, mask, self._pool)
        except torch.cuda.OutOfMemoryError:
            self._eager_only.add(key)
            torch.cuda.empty_cache()
            return None
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


def bucket_length(length: int) -> int:
    """The length a forward is padded to: 8 up to 8, above that the next multiple of a quarter
    of the power of two below (four sizes per octave, under 25% padding)."""
    if length <= 8:
        return 8
    step = 1 << (length.bit_length() - 3)
    return -(-length // step) * step


def _pad_to_bucket(input_ids: torch.Tensor, mask: Optional[torch.Tensor]):
    """input_ids right-padded to bucket_length (token 0) and a mask that is 0 on the padding."""
    batch, length = input_ids.shape
    extra = bucket_length(length) - length
    if mask is None:
        mask = torch.ones_like(input_ids)
    if extra == 0:
        return input_ids, mask
    return F.pad(input_ids, (0, extra)), F.pad(mask, (0, extra))


class _Graph:
    """One captured forward (to the final hidden states) with its static input buffers."""

    def __init__(self, model, input_ids, mask, pool):
        self.ids = input_ids.clone()
        self.mask = None if mask is None else mask.clone()
        with _statistics_kept(model.recorder):
            # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model.hidden_states(self.ids, mask=self.mask)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.hidden = model.hidden_states(self.ids, mask=self.mask)

    def replay(self, input_ids, mask):
        self.ids.copy_(input_ids)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.hidden


class _statistics_kept:
    """The warm-up forward must not count in the recorder's statistics: put them back after it."""

    def __init__(self, recorder):
        self.recorder = recorder

    def __enter__(self):
        if self.recorder is not None:
            self.saved = (self.recorder.partial_sums.clone(), self.recorder.partial_maxes.clone())

    def __exit__(self, *exc):
        if self.recorder is not None:
            self.recorder.partial_sums.copy_(self.saved[0])
            self.recorder.partial_maxes.copy_(self.saved[1])
        return False

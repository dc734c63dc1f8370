"""Loglikelihood requests scored a batch at a time, with HFLM's answers bit for bit.

HFLM's `_loglikelihood_tokens` (lm-eval 0.4.13) builds each request's input as a tensor on the
device and scores each request on its own: an argmax, a comparison, a gather and a sum, read back
with `float()` and `bool()`. That is a dozen small GPU operations and two synchronizations per
request, which on a GPU cost more than the batch's forward. `loglikelihood_tokens` keeps HFLM's
batches, order, padding, truncation, one-token-continuation reuse and cache calls, and scores a
batch with one argmax, one indexing, one small sum per continuation and two reads:
- argmax and indexing pick values without arithmetic, whatever the batch's shape;
- each continuation's log-probabilities are summed by torch's `sum` over a contiguous tensor of
  their count, starting on a 16-byte boundary, as HFLM's fresh `gather` output is: the same
  reduction, in the same order.
As in HFLM, a continuation's log-probabilities are read at its first positions of the scored
window and its greedy match at the last. tests/test_scoring.py compares the answers with HFLM's
own method on the CPU and, where there is one, on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.utils import Collator
from tqdm import tqdm

from .lm_eval_patches import logger

# Each continuation's values start at a multiple of this many bytes (torch vectorizes aligned loads).
ALIGNMENT = 16


def loglikelihood_tokens(lm, requests, disable_tqdm: bool = False, override_bs=None) -> list[tuple[float, bool]]:
    """HFLM._loglikelihood_tokens(lm, requests, ...) for a causal model, a batch at a time."""
    ordered = Collator(requests, sort_fn=_longest_first, group_by="contexts" if lm.logits_cache else None,
                       group_fn=_context_and_leading_continuation)
    automatic = lm.batch_size == "auto" and len(ordered) > 0 and not override_bs
    if automatic:
        lm.batch_sizes = {}  # as HFLM: sizes detected for another task's lengths are not reused
    batch_size = lm.batch_size if lm.batch_size != "auto" else override_bs or 0
    answers = []
    progress = tqdm(total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Running loglikelihood requests")
    for chunk in ordered.get_batched(n=batch_size, batch_fn=lm._batch_scheduler if automatic else None):
        for request_str, answer in score_batch(lm, chunk, ordered):
            answers.append(answer)
            if request_str is not None:  # loglikelihood_rolling's windows are cached by their caller
                lm.cache_hook.add_partial("loglikelihood", request_str, answer)
            progress.update(1)
    progress.close()
    return ordered.get_original(answers)


def _longest_first(request) -> tuple:
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _context_and_leading_continuation(request) -> list[int]:
    return request[-2] + request[-1][:-1]


def model_inputs(lm, chunk) -> list[list[int]]:
    """Each request's input: context and continuation, cut from the left to max_length + 1 tokens,
    without the last token."""
    inputs = []
    for _, context, continuation in chunk:
        if not context or not continuation or len(continuation) > lm.max_length:
            raise ValueError(f"a loglikelihood request needs a context, and a continuation of 1 to {lm.max_length} "
                             f"tokens: got {len(context)} and {len(continuation)}")
        whole = context + continuation
        if len(whole) > lm.max_length + 1:
            logger.warning(f"context ({len(context)} tokens) and continuation ({len(continuation)}) exceed the "
                           f"maximum length {lm.max_length}: {len(whole) - lm.max_length + 1} tokens cut from the left")
        inputs.append(whole[-(lm.max_length + 1):][:-1])
    return inputs


def score_batch(lm, chunk, ordered: Collator):
    """(request string, (log-probability, greedy)) for each request answered by this batch, in
    HFLM's order."""
    inputs = model_inputs(lm, chunk)
    width = max(map(len, inputs))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in inputs], dtype=torch.long)  # HFLM pads with 0
    lm._note_padding([len(row) for row in inputs], width, "right", lm.device)
    logprobs = F.log_softmax(lm._model_call(batch.to(lm.device)), dim=-1, dtype=lm.softmax_dtype)
    windows = []  # (row, first position, length) of each request's scored window
    scored = []  # (request string, continuation, its window): every request the batch answers
    placeholder = torch.empty(1, 0, 0)  # get_cache repeats it per request sharing the logits
    for row, ((request_str, context, continuation), tokens) in enumerate(zip(chunk, inputs)):
        windows.append((row, len(tokens) - len(continuation), len(continuation)))
        for member_str, member_continuation, _ in ordered.get_cache(
                req_str=request_str, cxt_toks=context, cont_toks=continuation, logits=placeholder):
            scored.append((member_str, member_continuation, windows[-1]))
    greedy = greedy_tokens(logprobs, windows)
    sums = continuation_sums(logprobs, [(row, start, cont) for _, cont, (row, start, _) in scored])
    for (request_str, continuation, window), total in zip(scored, sums):
        yield request_str, (total, greedy[window][-len(continuation):] == list(continuation))


def greedy_tokens(logprobs: torch.Tensor, windows: list[tuple[int, int, int]]) -> dict:
    """{(row, first position, length): the argmax token at each of the window's positions}; only
    the windows' positions are read, not the whole batch's."""
    rows = [row for row, start, length in windows for _ in range(length)]
    positions = [position for _, start, length in windows for position in range(start, start + length)]
    index = torch.tensor([rows, positions], dtype=torch.long).to(logprobs.device)
    tokens = logprobs[index[0], index[1]].argmax(dim=-1).tolist()
    found, first = {}, 0
    for window in windows:
        found[window] = tokens[first:first + window[2]]
        first += window[2]
    return found


def continuation_sums(logprobs: torch.Tensor, picks: list[tuple[int, int, list[int]]]) -> list[float]:
    """For each (row, first position, tokens): the sum of logprobs[row, first + j, tokens[j]]."""
    aligned = ALIGNMENT // logprobs.element_size()
    rows, positions, tokens, spans = [], [], [], []
    for row, start, continuation in picks:
        spans.append((len(rows), len(continuation)))
        padded = -len(continuation) % aligned  # so that the next span starts aligned
        rows += [row] * (len(continuation) + padded)
        positions += list(range(start, start + len(continuation))) + [start] * padded
        tokens += list(continuation) + [continuation[0]] * padded
    index = torch.tensor([rows, positions, tokens], dtype=torch.long).to(logprobs.device)
    values = logprobs[index[0], index[1], index[2]]
    return torch.stack([values[first:first + count].sum() for first, count in spans]).tolist()

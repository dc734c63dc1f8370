#!/usr/bin/env python
"""Train the bundled demo model: a tiny 24-layer Mamba on the synthetic demo corpus (CPU, seeded).

Trains `lm_eval_floatsim.mamba.MambaLM` (d_model 48, 24 layers, d_state 8, vocabulary 528 padded
to 528; 443,568 parameters, 1.8 MB) in fp mode with AdamW (lr 4e-3, warmup 40 steps, cosine to
4e-4, batch 32, one epoch over 12,800 passages = 400 steps) on next-token loss over the training
passages of `scripts/make_demo_data.py` (read from `examples/demo/train.txt` when that has enough
lines, else regenerated in memory; same passages either way), each passage's last token weighted
4x. Then it saves `examples/demo/model/` in the original mamba_ssm layout: `config.json` (d_model,
n_layer, vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple)
and `model.safetensors` (`backbone.*` only: mamba_ssm ties lm_head to the embedding). The
tokenizer files in that folder come from make_demo_data.py and are left alone.

Outlier channels. In pretrained Mambas a few channels of the Conv1D+SiLU output carry values far
above the others'; the 0.9995 quantile of |y| that sets the int8 output scale then lies below
their largest values, and the int8 kernel clips those. A model this small, trained this briefly,
grows no such channels (the previous demo model, trained without them, lost 0.002 in int8), so
the recipe plants them: in every block, 2 of the 96 channels (seeded) start with their in_proj
row (the conv input) and their conv weights 5x mamba_ssm's initialisation, a conv output about
25x the others'. AdamW's steps do not grow with the weights, so those channels stay large through
training and the model learns to use them: in the shipped model the largest channel's |y| over the
calibration passages is 10-31x the median channel's in every block (the third largest 2-4x).
A gain of 8 (64x) diverged (loss NaN before step 100).

The score printed at the end is the greedy last-word accuracy on the task passages
(`examples/demo/task/demo_lambada.jsonl`): the argmax of the model's own fp forward at the
position before the target word equals the target token.

Measured for the shipped model (default arguments with `--threads 1`, on the project's shared
2-core dev machine while other jobs kept its load at 5-8, torch 2.13, 2026-12-03):
    accuracy 0.6605 on the 2000 task passages (on the first 100: 0.32 at step 200, 0.68 at
    step 300, 0.62 at step 400), training wall time 650 s (10.8 min), 400 steps. One thread is
    faster than two on a loaded machine: with two, the same run managed under 100 steps in 10 min.
    A rerun of the same command on the same machine (load higher, 1304 s) wrote a byte-identical
    model.safetensors, with the same loss and accuracy at every logged step.
lm_eval with `--model mamba_floatsim --include_path examples/demo/task --tasks demo_lambada`
(2000 passages) then gives the accuracies in the README's demo section: int8 0.027 (2.5
standard errors) below fp, better (2025) with the int8 range no better than int8, and better
with clamp=none back at fp: the loss is the outliers' clipping, not the rounding.
Runs on different torch builds agree to the third decimal of the loss for the first 100 steps and
drift slightly after.

MambaLM's PyTorch selective scan is written for inference (it fills its output in place, which
autograd cannot differentiate; on CUDA the Triton kernels have no backward either), so training
swaps in a differentiable scan (`_train_scan`: the same recurrence with a hand-written backward)
for the training steps only; the reported accuracy is computed with the model's own forward.
Training runs on the CPU only: MambaLM's CUDA path (Triton conv, norm and scan kernels) has no
backward.

Usage:  python scripts/make_demo_data.py && python scripts/train_demo_model.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_demo_data  # noqa: E402
import lm_eval_floatsim.mamba as mamba_module  # noqa: E402
from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402


class _LinearRecurrence(torch.autograd.Function):
    """All states of h_t = a_t * h_{t-1} + b_t along dim 1 (h_{-1} = 0), with its backward."""

    @staticmethod
    def forward(ctx, a, b):
        hs = torch.empty_like(b)
        h = torch.zeros_like(b[:, 0])
        for t in range(b.shape[1]):
            h = torch.addcmul(b[:, t], a[:, t], h, out=hs[:, t])
        ctx.save_for_backward(a, hs)
        return hs

    @staticmethod
    def backward(ctx, grad):
        a, hs = ctx.saved_tensors
        length = grad.shape[1]
        grad_b = torch.empty_like(grad)
        acc = grad_b[:, length - 1].copy_(grad[:, length - 1])
        for t in range(length - 2, -1, -1):
            acc = torch.addcmul(grad[:, t], a[:, t + 1], acc, out=grad_b[:, t])
        grad_a = torch.zeros_like(a)
        grad_a[:, 1:] = grad_b[:, 1:] * hs[:, :-1]
        return grad_a, grad_b


def _train_scan(u, delta, A, B, C, D, z, delta_bias, h0=None, return_last_state=False):
    """Differentiable stand-in for lm_eval_floatsim.selective_scan.selective_scan (training only)."""
    if h0 is not None or return_last_state:
        raise NotImplementedError("the training scan has no recurrent state")
    u32 = u.float()
    delta = F.softplus(delta.float() + delta_bias.float())
    dA = torch.exp(delta[..., None] * A.float())
    dBu = delta[..., None] * B.float()[:, :, None, :] * u32[..., None]
    hs = _LinearRecurrence.apply(dA, dBu)
    y = torch.einsum("bldn,bln->bld", hs, C.float())
    return ((y + u32 * D.float()) * F.silu(z.float())).to(u.dtype)


def plant_outlier_channels(model: MambaLM, n_channels: int, gain: float, generator) -> None:
    """Scale the in_proj row (conv input) and the conv weights of `n_channels` random channels of
    every block by `gain`: their conv output starts gain**2 times larger than the others'."""
    with torch.no_grad():
        for layer in model.backbone.layers:
            mixer = layer.mixer
            channels = torch.randperm(mixer.conv1d.weight.shape[0], generator=generator)[:n_channels]
            mixer.conv1d.weight[channels] *= gain
            mixer.in_proj.weight[channels] *= gain  # rows 0..d_inner-1 are x, the conv input


def init_weights(model: MambaLM, seed: int) -> None:
    """mamba_ssm's initialisation (Mamba.__init__ + _init_weights)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        model.backbone.embedding.weight.normal_(0.0, 0.02, generator=g)
        for layer in model.backbone.layers:
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt(5))
                lin.weight.uniform_(-bound, bound, generator=g)
                if lin.bias is not None:
                    lin.bias.zero_()
            mixer.out_proj.weight /= math.sqrt(cfg.n_layer)
            k = mixer.conv1d.weight.shape[-1]
            bound = 1.0 / math.sqrt(k)
            mixer.conv1d.weight.uniform_(-bound, bound, generator=g)
            if mixer.conv1d.bias is not None:
                mixer.conv1d.bias.uniform_(-bound, bound, generator=g)
            std = cfg.dt_rank_value ** -0.5
            mixer.dt_proj.weight.uniform_(-std, std, generator=g)
            dt = torch.exp(torch.rand(cfg.d_inner, generator=g) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3)).clamp(min=1e-4)
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            mixer.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1).float()).repeat(cfg.d_inner, 1))
            mixer.D.fill_(1.0)
            layer.norm.weight.fill_(1.0)
        model.backbone.norm_f.weight.fill_(1.0)


def load_train_texts(n_train: int) -> list[str]:
    path = DEMO / "train.txt"
    if path.exists():
        texts = [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]
        if len(texts) >= n_train:
            return texts[:n_train]
    return make_demo_data.generate(n_train, make_demo_data.TRAIN_SEED, heldout=False)


def load_task(tokenizer) -> tuple[list[list[int]], list[int]]:
    contexts, targets = [], []
    for line in open(DEMO / "task" / "demo_lambada.jsonl", encoding="utf-8"):
        text = json.loads(line)["text"]
        ctx, last = text.rsplit(" ", 1)
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        whole = tokenizer(ctx + " " + last, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx_ids)] == ctx_ids and len(whole) == len(ctx_ids) + 1, text
        contexts.append(ctx_ids)
        targets.append(whole[-1])
    return contexts, targets


@torch.no_grad()
def last_word_accuracy(model: MambaLM, contexts, targets, batch_size: int = 64) -> float:
    """Greedy last-word exact match with the model's own forward (right padding: causal)."""
    model.eval()
    hits = 0
    for start in range(0, len(contexts), batch_size):
        ctxs, tgts = contexts[start:start + batch_size], targets[start:start + batch_size]
        width = max(map(len, ctxs))
        ids = torch.zeros(len(ctxs), width, dtype=torch.long)
        for i, c in enumerate(ctxs):
            ids[i, : len(c)] = torch.tensor(c)
        logits = model(ids.to(model.device)).cpu()
        last = torch.tensor([len(c) - 1 for c in ctxs])
        pred = logits[torch.arange(len(ctxs)), last].argmax(-1)
        hits += int((pred == torch.tensor(tgts)).sum())
    model.train()
    return hits / len(contexts)


def batches(seqs: list[list[int]], batch_size: int, rng: random.Random, pad_id: int):
    """Shuffled batches of similar length (sort within pools of 50 batches), right-padded."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    pool = batch_size * 50
    groups = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lambda i: len(seqs[i]))
        groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        width = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        yield ids


def save_mamba_ssm(model: MambaLM, out: Path) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    config = {
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand},
        "rms_norm": cfg.rms_norm,
        "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
    }
    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the bundled demo Mamba (CPU).")
    ap.add_argument("--out", default=str(DEMO / "model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=48)
    ap.add_argument("--d-state", type=int, default=8)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-train", type=int, default=12800, help="training passages (one epoch)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--last-word-weight", type=float, default=4.0,
                    help="loss weight of each passage's last token (the others weigh 1)")
    ap.add_argument("--outlier-channels", type=int, default=2,
                    help="conv channels per block whose initial weights are scaled by --outlier-gain")
    ap.add_argument("--outlier-gain", type=float, default=5.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    start = time.time()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO / "model"))
    texts = load_train_texts(args.n_train)
    seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    contexts, targets = load_task(tokenizer)

    config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=len(tokenizer),
                         d_state=args.d_state)
    model = MambaLM(config)
    init_weights(model, args.seed)
    plant_outlier_channels(model, args.outlier_channels, args.outlier_gain,
                           torch.Generator().manual_seed(args.seed + 1))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d_model={config.d_model} n_layer={config.n_layer} d_state={config.d_state} "
          f"vocab={config.vocab_size} params={n_params}", flush=True)

    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(("A_log", "D"))
                or "embedding" in n]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(seqs) / args.batch_size)
    total = max(1, int(steps_per_epoch * args.epochs))
    warmup = min(100, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    pad = tokenizer.pad_token_id
    original_scan = mamba_module.selective_scan
    model.train()
    step, epoch, running = 0, 0, None
    while step < total:
        for ids in batches(seqs, args.batch_size, rng, pad):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            mamba_module.selective_scan = _train_scan
            try:
                logits = model(ids[:, :-1]).float()
            finally:
                mamba_module.selective_scan = original_scan
            labels = ids[:, 1:]
            weights = (labels != pad).float()
            lengths = (ids != pad).sum(1)
            weights[torch.arange(len(ids), device=ids.device), lengths - 2] = args.last_word_weight
            loss_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       reduction="none").view_as(weights)
            loss = (loss_tok * weights).sum() / weights.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % args.eval_every == 0 or step == total:
                acc = last_word_accuracy(model, contexts[:100], targets[:100])
                seen = last_word_accuracy(model, [s[:-1] for s in seqs[:100]], [s[-1] for s in seqs[:100]])
                print(f"step {step}/{total} loss {running:.3f} lr {lr_at(step - 1):.2e} "
                      f"acc@100 {acc:.2f} (train {seen:.2f}) {time.time() - start:.0f}s", flush=True)
        epoch += 1

    train_time = time.time() - start
    acc = last_word_accuracy(model, contexts, targets)
    save_mamba_ssm(model, Path(args.out))
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"accuracy {acc:.4f} on {len(targets)} task passages (greedy last word, fp)")
    print(f"training wall time {train_time:.0f} s ({train_time / 60:.1f} min), {step} steps")
    print(f"saved {args.out} (model.safetensors {size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

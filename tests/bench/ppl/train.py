"""Trains the perplexity harness's model (issue 16 item 1), on the CPU by default.

A byte-level Llama-style decoder (model.py; default Config: hidden 512, 4 layers, 4 query
heads and 2 KV heads of head_dim 128, SwiGLU 1408, RoPE theta 10000, 12.1 M parameters) on
the train split of recipe.py, next-byte cross-entropy on random WINDOW-byte windows
(positions 0..511 all trained, so the harness's prompts stay in the trained range).
AdamW (0.9, 0.95), weight decay 0.1 on matrices, gradient clip 1.0, linear warm-up over
--warmup steps, then cosine decay to 10 % over a WALL-TIME budget (--minutes): the
machine's two cores are shared with other work, so the number of steps that fit is not
known in advance, and a step-count schedule cut short would end at a high learning rate.
Data order is fixed by --seed; the steps actually run are in the record. Every
--eval-every steps the loss on the first 16 held-out windows is logged (a fixed slice, only
watched, never used to choose anything). The weights are written in fp16 with their config
and this run's record (model.save). --device cuda trains the same way on a GPU (fp32),
where the same budget buys about a hundred times more steps.

Torch's matmuls run on the system BLAS; Debian's default is the netlib reference (about
2 GFLOP/s here). For the record run, OpenBLAS was unpacked from Debian's package, not
installed, and put first on the library path for this process only:

    apt-get download libopenblas0-pthread && dpkg -x libopenblas0-pthread_*.deb /tmp/oblas
    LD_LIBRARY_PATH=/tmp/oblas/usr/lib/x86_64-linux-gnu/openblas-pthread \\
        /usr/bin/python3 tests/bench/ppl/train.py --out tests/data/model/bytelm.npz
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as lm  # noqa: E402
import recipe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def init_weights(m, cfg):
    """GPT-2-style: N(0, 0.02), the residual outputs (wo, w_down) scaled by 1/sqrt(2L)."""
    for name, p in m.named_parameters():
        if name.endswith("norm.weight") or ".attn_norm." in name or ".mlp_norm." in name:
            continue
        std = 0.02
        if name.endswith("wo.weight") or name.endswith("w_down.weight"):
            std /= math.sqrt(2 * cfg.layers)
        torch.nn.init.normal_(p, 0.0, std)


def heldout_loss(m, windows):
    with torch.no_grad():
        m.eval()
        tot, n = 0.0, 0
        for i in range(0, len(windows), 8):
            x = windows[i:i + 8]
            logits = m(x[:, :-1])
            tot += F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            n += x[:, 1:].numel()
        m.train()
    return tot / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "tests/data/model/bytelm.npz"))
    ap.add_argument("--minutes", type=float, default=24.0,
                    help="training wall-time budget (the schedule's length)")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=recipe.WINDOW)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = lm.Config(max_seq=a.seq)

    t0 = time.time()
    items = recipe.corpus()
    stream = recipe.train_stream(items)
    dev = torch.device(a.device)
    data = torch.from_numpy(np.frombuffer(stream, dtype=np.uint8).astype(np.int64)).to(dev)
    held = np.frombuffer(b"".join(recipe.heldout_windows(items)), dtype=np.uint8)
    held = torch.from_numpy(held.astype(np.int64)).view(-1, recipe.WINDOW)[:16].to(dev)
    print(f"data: train stream {len(stream)} bytes, held-out watch {held.shape[0]} windows, "
          f"read in {time.time() - t0:.1f} s", flush=True)

    m = lm.Model(cfg)
    init_weights(m, cfg)
    m.to(dev)
    decay = [p for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n]
    other = [p for n, p in m.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                             dict(params=other, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(a.seed)
    print(f"model: {cfg}, {lm.param_count(m)} parameters; {a.minutes} minutes of "
          f"{a.batch}x{a.seq}-token steps", flush=True)

    log, ema, step = [], None, 0
    t_start = time.time()
    budget = a.minutes * 60
    for step in range(1, a.max_steps + 1):
        frac = min(1.0, (time.time() - t_start) / budget)
        lr = a.lr * step / a.warmup if step <= a.warmup else \
            a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        off = torch.randint(0, len(data) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([data[o:o + a.seq + 1] for o in off.tolist()])
        logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0).item()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        last = time.time() - t_start >= budget
        if step % a.eval_every == 0 or last or step == 1:
            hl = heldout_loss(m, held)
            el = time.time() - t_start
            rec = dict(step=step, tokens=step * a.batch * a.seq, train_loss_ema=ema,
                       heldout16_loss=hl, heldout16_ppl=math.exp(hl), lr=lr, grad_norm=gn,
                       minutes=el / 60)
            log.append(rec)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rec.items()), flush=True)
        if last:
            break
    minutes = (time.time() - t_start) / 60
    meta = dict(training=dict(steps=step, budget_minutes=a.minutes, batch=a.batch,
                              seq=a.seq, tokens=step * a.batch * a.seq, lr=a.lr,
                              warmup=a.warmup, seed=a.seed, threads=a.threads,
                              minutes=minutes, log=log,
                              train_stream_bytes=len(stream),
                              recipe="tests/bench/ppl/recipe.py"))
    lm.save(m, a.out, meta)
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes) after {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()

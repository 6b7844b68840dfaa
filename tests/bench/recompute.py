"""Restore vs recompute on the GPU machine (issue 12): what a prompt prefix costs to
recompute (prefill) on a Llama-3-8B-shaped model, and what it costs to put restored KV back
into the model's paged cache and run the first decode step.

The model is our own minimal Llama decoder in PyTorch (RMSNorm, RoPE, grouped-query
attention through SDPA, SwiGLU), 32 layers, hidden 4096, 32 query heads, 8 KV heads of 128,
MLP 14336, bf16, batch 1, with RANDOM weights: timing does not depend on them. No
transformers, no downloads.

For each prefix length it reports:
  prefill_ms   prefill of the prompt (recomputing the KV), the time a cache miss costs
  h2d_ms       the prefix's KV (kvstash's block layout [L][2][t][H][D], fp16/bf16, in
               pinned host memory: where a shared-memory restore leaves it) copied to the
               GPU and scattered into the paged cache [L][2][blocks][16][H][D]
  decode_ms    the first decode step over the restored cache (the token after the prefix)
The TTFT with kvstash is restore_ms (kvs-bench-restore, the path's time to bring the
prefix into the worker's host memory) + h2d_ms + decode_ms; without, prefill_ms (+ the
first decode step, which both share). Printed as JSON lines for restore_gpu.sh.

    python3 tests/bench/recompute.py --tokens 1024,4096,8192,16384 [--reps 5]
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

L, HID, QH, KVH, HD, MLP, VOCAB, BLOCK = 32, 4096, 32, 8, 128, 14336, 128256, 16


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HID, (QH + 2 * KVH) * HD, bias=False)
        self.o = torch.nn.Linear(QH * HD, HID, bias=False)
        self.up = torch.nn.Linear(HID, 2 * MLP, bias=False)
        self.down = torch.nn.Linear(MLP, HID, bias=False)
        self.n1 = torch.nn.RMSNorm(HID)
        self.n2 = torch.nn.RMSNorm(HID)


def rope(x, pos):
    """x: [B, heads, T, HD]; rotary embedding at absolute positions pos [T]."""
    half = HD // 2
    inv = 1.0 / (500000.0 ** (torch.arange(0, half, device=x.device, dtype=torch.float32) / half))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HID)
        self.layers = torch.nn.ModuleList(Layer() for _ in range(L))
        self.norm = torch.nn.RMSNorm(HID)
        self.head = torch.nn.Linear(HID, VOCAB, bias=False)

    def forward(self, ids, pos, cache=None, past=0):
        """ids [1, T]. cache: [L][2][1, KVH, S, HD] tensors to attend over (decode) or None
        (prefill, causal). Returns logits of the last token and the new K/V per layer."""
        x = self.emb(ids)
        kvs = []
        for li, lay in enumerate(self.layers):
            h = lay.n1(x)
            q, k, v = lay.qkv(h).split([QH * HD, KVH * HD, KVH * HD], dim=-1)
            T = ids.shape[1]
            q = rope(q.view(1, T, QH, HD).transpose(1, 2), pos)
            k = rope(k.view(1, T, KVH, HD).transpose(1, 2), pos)
            v = v.view(1, T, KVH, HD).transpose(1, 2)
            kvs.append((k, v))
            if cache is not None:
                k = torch.cat([cache[li][0], k], dim=2)
                v = torch.cat([cache[li][1], v], dim=2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None,
                                               enable_gqa=True)
            x = x + lay.o(a.transpose(1, 2).reshape(1, T, QH * HD))
            g, u = lay.up(lay.n2(x)).chunk(2, dim=-1)
            x = x + lay.down(F.silu(g) * u)
        return self.head(self.norm(x[:, -1])), kvs


def timed(fn, reps):
    fn()  # warm-up
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e))
    return best


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,4096,8192,16384")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    dt = torch.bfloat16
    model = Model().to(dev, dt)
    for p in model.parameters():
        p.normal_(0, 0.02)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "params_b": sum(p.numel() for p in model.parameters()) / 1e9}))
    for n in map(int, args.tokens.split(",")):
        ids = torch.randint(0, VOCAB, (1, n), device=dev)
        pos = torch.arange(n, device=dev)
        prefill = timed(lambda: model(ids, pos), args.reps)
        nb = n // BLOCK
        # The restored prefix in host memory as kvstash hands it over: per block
        # [L][2][16][KVH][HD], blocks one after the other (a shared-memory region).
        host = torch.empty((nb, L, 2, BLOCK, KVH, HD), dtype=dt).pin_memory()
        host.normal_()
        paged = torch.empty((L, 2, nb, BLOCK, KVH, HD), dtype=dt, device=dev)
        staging = torch.empty_like(host, device=dev)

        def restore():
            staging.copy_(host, non_blocking=True)
            paged.copy_(staging.permute(1, 2, 0, 3, 4, 5))
        h2d = timed(restore, args.reps)
        # First decode step over the restored cache (contiguous view of the pages: the block
        # ids of one sequence are consecutive here).
        cache = [(paged[li, 0].reshape(1, n, KVH, HD).transpose(1, 2),
                  paged[li, 1].reshape(1, n, KVH, HD).transpose(1, 2)) for li in range(L)]
        nxt = torch.randint(0, VOCAB, (1, 1), device=dev)
        decode = timed(lambda: model(nxt, torch.tensor([n], device=dev), cache=cache), args.reps)
        kv_bytes = nb * L * 2 * BLOCK * KVH * HD * 2
        print(json.dumps({"tokens": n, "prefill_ms": round(prefill, 2), "h2d_ms": round(h2d, 2),
                          "decode_ms": round(decode, 2), "kv_bytes": kv_bytes,
                          "recompute_gbps": round(kv_bytes / prefill / 1e6, 2)}), flush=True)
        del host, paged, staging, cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

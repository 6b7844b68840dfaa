"""A multi-turn chat on a Llama-style model, with and without kvstash: the saving, measured.

Several users share a long system prompt and chat for a few turns; each turn's prompt is that
user's previous prompt and reply plus a new message. For every prompt the example

  1. computes the chained block keys (`kvstash.block_keys`),
  2. asks kvstash for the cached prefix (`Client.get_prefix`, one round trip),
  3. prefills only the uncached suffix on top of the restored KV and takes the next token,
  4. offloads the prompt's new full blocks (`Client.put_many`),
  5. checks the result against a full recompute of the same prompt without kvstash,
  6. times both ways to the first token (TTFT),

and prints a table per turn with totals (`--json PATH` writes the same as JSON).

The model is a decoder-only transformer in plain torch (RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU) with random weights from a fixed seed: no model hub is
needed, and the shapes, hence the bytes moved and the FLOPs saved, are the real ones. Token
ids are random too; the next token is only a correctness witness. Its KV cache is kept in the
storage dtype (fp16, or bf16 with --dtype bf16), as a serving engine's is, so the full
recompute and the restored path attend over the same kind of numbers. On the CPU the compute
is fp32 (torch's CPU matmul has no fp16), and K/V are rounded to fp16 when they enter the cache;
--dtype bf16 also runs on the CPU (bf16 compute and KV).

    # CPU, tiny model (seconds); a daemon on a Unix socket gives the shared-memory path:
    kvstashd --listen unix:/tmp/kvs.sock --host-capacity 1G &
    PYTHONPATH=client/python python3 client/python/examples/chat_reuse.py \\
        --target unix:/tmp/kvs.sock --model tiny --device cpu

    # GPU, Llama-3-8B shapes in fp16 (about 16 GB of weights; --layers N for fewer):
    PYTHONPATH=client/python python3 client/python/examples/chat_reuse.py \\
        --target unix:/tmp/kvs.sock --model llama3-8b --device cuda --system-tokens 4000 \\
        --turn-tokens 200 --reply-tokens 100 --codec none --json chat-8b.json

--codec C stores with a lossy codec (kivi-4, polarquant, fp8, ...): its logit error and token
matches are reported. --restore host fetches host arrays and copies them to the device in the
example instead of having the package write the blocks into device tensors (see KvBlocks).
Exit status 1 when codec `none` does not reproduce the full recompute (see TOLERANCE).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import kvstash


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    norm_eps: float = 1e-5


MODELS = {
    # Small enough for seconds on one CPU core; head_dim 64 as in many real models, with
    # fewer KV heads than query heads so that the GQA mapping is exercised.
    "tiny": Config(vocab=8192, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64,
                   intermediate=704, rope_theta=10000.0),
    # Llama-3-8B's shapes; its long-context RoPE scaling is left out (prompts here are short).
    "llama3-8b": Config(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
                        head_dim=128, intermediate=14336, rope_theta=500000.0),
}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Codec none: the largest |restored - recompute| logit difference allowed, relative to the
# largest |logit| of the recompute, by compute dtype. Both paths attend over the same K/V
# numbers (the cache dtype, see Model.forward); they differ only in the shapes of their
# matmuls (the suffix's rows against the whole prompt's), and a BLAS may pick another
# kernel, hence another accumulation order, per shape. With fp32 compute a last-bit
# difference can at worst flip a K/V element by one fp16 ulp (2^-11 relative), which moves
# the logits by far less than 1e-4 of their scale; torch 1.13's CPU kernels give 0 (bit
# identical). A real fault is far above: a RoPE offset off by the prefix length gives ~0.5,
# kivi-4's 4-bit KV ~0.02. In fp16/bf16 compute every layer rounds its activations to
# 2^-11/2^-8 and a per-shape kernel choice changes those roundings, compounding with depth:
# the looser bounds are set from that, not yet measured with 32 layers on a GPU.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


# ----------------------------------------------------------------------------- the model


class Model:
    """Weights [in, out] so that a layer is `x @ w`; batch size 1, tokens along dim 0."""

    def __init__(self, cfg, device, dtype, kv_dtype, seed=0):
        self.cfg, self.device, self.dtype, self.kv_dtype = cfg, device, dtype, kv_dtype
        g = torch.Generator(device=device)
        g.manual_seed(seed)

        def w(n_in, n_out):
            # std 1/sqrt(n_in) keeps each layer's outputs O(1), so attention is neither
            # uniform nor one-hot and the logits have a clear top token.
            t = torch.randn(n_in, n_out, generator=g, device=device, dtype=dtype)
            return t.mul_(n_in ** -0.5)

        c = cfg
        self.embed = torch.randn(c.vocab, c.hidden, generator=g, device=device, dtype=dtype)
        self.layers = []
        for _ in range(c.layers):
            self.layers.append(dict(
                attn_norm=torch.ones(c.hidden, device=device, dtype=dtype),
                wq=w(c.hidden, c.heads * c.head_dim),
                wk=w(c.hidden, c.kv_heads * c.head_dim),
                wv=w(c.hidden, c.kv_heads * c.head_dim),
                wo=w(c.heads * c.head_dim, c.hidden),
                mlp_norm=torch.ones(c.hidden, device=device, dtype=dtype),
                w_gate=w(c.hidden, c.intermediate),
                w_up=w(c.hidden, c.intermediate),
                w_down=w(c.intermediate, c.hidden)))
        self.norm = torch.ones(c.hidden, device=device, dtype=dtype)
        self.lm_head = w(c.hidden, c.vocab)
        self.inv_freq = 1.0 / (c.rope_theta ** (
            torch.arange(0, c.head_dim, 2, device=device, dtype=torch.float32) / c.head_dim))

    def _rms(self, x, weight):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return x32.to(self.dtype) * weight

    def _rope(self, start, n):
        pos = torch.arange(start, start + n, device=self.device, dtype=torch.float32)
        f = torch.outer(pos, self.inv_freq)
        f = torch.cat([f, f], dim=-1)[:, None, :]  # [n, 1, D], broadcast over heads
        return f.cos().to(self.dtype), f.sin().to(self.dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin

    def _attention(self, q, k, v, start):
        """q [n, H, D] at positions start..start+n-1; k, v [start+n, H_kv, D]."""
        c = self.cfg
        n, s = q.shape[0], k.shape[0]
        rep = c.heads // c.kv_heads
        q = q.transpose(0, 1)
        k = k.repeat_interleave(rep, dim=1).transpose(0, 1)
        v = v.repeat_interleave(rep, dim=1).transpose(0, 1)
        # Query i sits at absolute position start+i and sees keys 0..start+i.
        if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0: fused kernels
            if start == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = (torch.arange(s, device=self.device)[None, :] <=
                        torch.arange(start, start + n, device=self.device)[:, None])
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = (q @ k.transpose(-1, -2)).float() * c.head_dim ** -0.5
            mask = (torch.arange(s, device=self.device)[None, :] >
                    torch.arange(start, start + n, device=self.device)[:, None])
            scores.masked_fill_(mask, float("-inf"))
            o = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        return o.transpose(0, 1).reshape(n, c.heads * c.head_dim)

    @torch.inference_mode()
    def forward(self, tokens, past=None, start=0):
        """Prefills `tokens` (1-D, on the device) at positions start.. on top of `past`
        (per layer (K, V) [start, H_kv, D] in kv_dtype, keys after RoPE, or None when
        start is 0). Returns (logits of the last position, fp32 [vocab]; the new tokens'
        KV per layer, (K, V) [n, H_kv, D] in kv_dtype)."""
        c = self.cfg
        n = tokens.shape[0]
        cos, sin = self._rope(start, n)
        x = self.embed[tokens]
        new_kv = []
        for i, p in enumerate(self.layers):
            h = self._rms(x, p["attn_norm"])
            q = self._rotate((h @ p["wq"]).view(n, c.heads, c.head_dim), cos, sin)
            k = self._rotate((h @ p["wk"]).view(n, c.kv_heads, c.head_dim), cos, sin)
            v = (h @ p["wv"]).view(n, c.kv_heads, c.head_dim)
            # The cache holds kv_dtype: rounding here, in both paths, is what makes a
            # restored block and a recomputed one the same numbers.
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
            new_kv.append((k, v))
            if past is not None:
                k, v = torch.cat([past[i][0], k]), torch.cat([past[i][1], v])
            x = x + self._attention(q, k.to(self.dtype), v.to(self.dtype), start) @ p["wo"]
            h = self._rms(x, p["mlp_norm"])
            x = x + (F.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
        # Only the last position's logits: prefill needs nothing else for the first token.
        logits = (self._rms(x[-1:], self.norm) @ self.lm_head).float()[0]
        return logits, new_kv


# ----------------------------------------------------------------------------- KV <-> blocks


class KvBlocks:
    """Moves KV between the model's per-layer cache and kvstash blocks [L][2][t][H_kv][D]
    (K then V per layer).

    direct: blocks land in tensors on the model's device (get_prefix's `out`) and are stored
    from there; on CUDA the package copies each block once between the shared-memory region
    and the GPU, or decodes a compressing codec's blocks on the GPU ("+gpudecode").
    host: get_prefix returns host numpy arrays (fp16, or bf16 bits) and the example moves
    them to the device itself, through one pinned staging buffer: what a client that cannot
    write into device memory does."""

    def __init__(self, cfg, device, kv_dtype, block_tokens, direct):
        self.cfg, self.device, self.kv_dtype, self.bt = cfg, device, kv_dtype, block_tokens
        self.direct = direct
        self.bf16 = kv_dtype == torch.bfloat16
        # numpy has no bf16: its bits travel as int16 (torch.from_numpy takes no uint16).
        self.np_dtype = np.int16 if self.bf16 else np.float16
        self.host_dtype = torch.int16 if self.bf16 else torch.float16
        self._staging = None  # pinned host buffer (host mode on CUDA), grown on demand

    def _layers(self, kv):
        return [(kv[i, 0], kv[i, 1]) for i in range(self.cfg.layers)]

    def fetch(self, client, ns, keys):
        """The cached prefix of a prompt whose first block keys are `keys`: (blocks hit,
        the model's `past` on its device, or None when nothing was hit)."""
        c, bt = self.cfg, self.bt
        if not keys:
            return 0, None
        if self.direct:
            buf = torch.empty((len(keys), c.layers, 2, bt, c.kv_heads, c.head_dim),
                              dtype=self.kv_dtype, device=self.device)
            n = len(client.get_prefix(ns, keys, out=list(buf)))
            if not n:
                return 0, None
            # Block-major to the cache's token-major layout: one copy on the device.
            kv = buf[:n].permute(1, 2, 0, 3, 4, 5).reshape(c.layers, 2, n * bt, c.kv_heads,
                                                             c.head_dim)
            return n, self._layers(kv)
        blocks = client.get_prefix(ns, keys)
        if not blocks:
            return 0, None
        shape = (c.layers, 2, len(blocks) * bt, c.kv_heads, c.head_dim)
        elems = int(np.prod(shape))
        if self.device.type == "cuda":
            if self._staging is None or self._staging.numel() < elems:
                self._staging = torch.empty(elems, dtype=self.host_dtype, pin_memory=True)
            host = self._staging[:elems].view(shape)
        else:
            host = torch.empty(shape, dtype=self.host_dtype)
        # One host copy, straight into the (pinned) staging buffer; its reuse by the next
        # turn is safe because every turn synchronizes before reading the clock.
        np.concatenate([b.view(self.np_dtype) for b in blocks], axis=2, out=host.numpy())
        kv = host.to(self.device, non_blocking=True)
        if self.bf16:
            kv = kv.view(torch.bfloat16)
        return len(blocks), self._layers(kv)

    def blocks(self, new_kv, count):
        """The first `count` blocks of `new_kv` (the model's per-layer KV of tokens that
        start at a block boundary), as what put_many takes: [L][2][bt][H_kv][D] each."""
        c = self.cfg
        kv = torch.stack([torch.stack(p) for p in new_kv])  # [L, 2, n, H_kv, D]
        kv = kv[:, :, :count * self.bt]
        kv = kv.reshape(c.layers, 2, count, self.bt, c.kv_heads, c.head_dim)
        kv = kv.permute(2, 0, 1, 3, 4, 5).contiguous()
        if self.direct:
            return list(kv)  # tensors on the device; the package copies each once
        if self.bf16:
            kv = kv.view(torch.int16)
        host = kv.cpu().numpy()  # one device-to-host copy for all blocks
        return [host[i] for i in range(count)]


# ----------------------------------------------------------------------------- the chat


SYSTEM, MESSAGE, REPLY, WARMUP = 0, 1, 2, 3


def conversation_tokens(seed, kind, user, turn, n, vocab):
    """n random token ids for one part of the conversation (kind: SYSTEM, MESSAGE, REPLY or
    WARMUP), the same whatever order the turns run in."""
    return np.random.default_rng([seed, kind, user, turn]).integers(0, vocab, n).tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_turn(model, kvb, client, ns, prompt, device, block_tokens):
    """One prompt both ways. Returns the turn's record (see the table) and the reference
    next token."""
    bt = block_tokens
    n_prompt = len(prompt)
    tokens = torch.tensor(prompt, dtype=torch.long, device=device)

    # Without kvstash: the whole prompt.
    sync(device)
    t0 = time.perf_counter()
    ref_logits, _ = model.forward(tokens)
    ref_token = int(ref_logits.argmax())
    sync(device)
    ttft_full = time.perf_counter() - t0

    # With kvstash. At most (n-1)//bt blocks are looked up: the last prompt token must be
    # computed to produce logits, even when the whole prompt is cached.
    n_full = n_prompt // bt
    n_lookup = (n_prompt - 1) // bt
    sync(device)
    t0 = time.perf_counter()
    keys = kvstash.block_keys(prompt, bt)
    n_hit, past = kvb.fetch(client, ns, keys[:n_lookup])
    sync(device)
    t1 = time.perf_counter()
    start = n_hit * bt
    logits, new_kv = model.forward(tokens[start:], past, start)
    token = int(logits.argmax())
    sync(device)
    t2 = time.perf_counter()
    get_path = client.last_path if n_lookup else None

    # Offload after the first token: it is off the TTFT path in a real engine too.
    n_put = n_full - n_hit
    if n_put:
        results = client.put_many(ns, zip(keys[n_hit:n_full], kvb.blocks(new_kv, n_put)))
        failed = [r for r in results if isinstance(r, kvstash.KvstashError)]
        if failed:
            raise failed[0]
    t3 = time.perf_counter()

    err = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    top2 = ref_logits.topk(2).values
    return dict(
        prompt_tokens=n_prompt, blocks_looked_up=n_lookup, blocks_hit=n_hit,
        tokens_reused=start, tokens_computed=n_prompt - start, blocks_put=n_put,
        ttft_full_ms=ttft_full * 1e3, ttft_kvstash_ms=(t2 - t0) * 1e3,
        restore_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3, put_ms=(t3 - t2) * 1e3,
        next_token_full=ref_token, next_token_kvstash=token, match=token == ref_token,
        top2_margin=(top2[0] - top2[1]).item(), logit_scale=scale,
        max_abs_err=err, max_rel_err=err / scale if scale else 0.0,
        get_path=get_path, put_path=client.last_path if n_put else None), ref_token


def open_namespace(client, args, cfg):
    kv_name = "bf16" if args.kv_dtype == "bf16" else "fp16"
    want = dict(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                block_tokens=args.block_tokens, dtype=kv_name, key_codec=args.codec,
                value_codec=args.codec)
    if args.fresh:
        try:
            client.drop_namespace(args.namespace)
        except kvstash.KvstashError as e:
            if e.status != "NOT_FOUND":
                raise
    try:
        return client.create_namespace(args.namespace, **want)
    except kvstash.KvstashError as e:
        if e.status != "ALREADY_EXISTS":
            raise
    # Reusing a namespace is the point of a cache, but only one of the same layout.
    ns = client.namespace(args.namespace)
    have = {f: getattr(ns, f) for f in want}
    if have != want:
        raise SystemExit(f"namespace {args.namespace!r} exists with {have}, this run needs "
                         f"{want}: pick another --namespace or pass --fresh")
    return ns


def run(args):
    """The whole workload; returns the summary (what --json writes)."""
    cfg = MODELS[args.model]
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if device.type == "cpu" and args.dtype == "fp16":
        raise SystemExit("--dtype fp16 on CPU: torch's CPU matmul has no fp16; use fp32 "
                         "(the KV cache stays fp16)")
    dtype, kv_dtype = DTYPES[args.dtype], DTYPES[args.kv_dtype]
    t0 = time.perf_counter()
    model = Model(cfg, device, dtype, kv_dtype, seed=args.seed)
    sync(device)
    build_s = time.perf_counter() - t0
    kvb = KvBlocks(cfg, device, kv_dtype, args.block_tokens, args.restore == "direct")

    lens = [args.system_tokens + (t + 1) * args.turn_tokens + t * args.reply_tokens
            for t in range(args.turns)]
    block_bytes = cfg.layers * 2 * args.block_tokens * cfg.kv_heads * cfg.head_dim * 2
    # The client's shared-memory region must hold a whole prompt's blocks, or the batch
    # quietly goes over gRPC instead.
    region = max(256 << 20, (max(lens) // args.block_tokens + 1) * block_bytes)
    client = kvstash.Client(args.target, token=args.token, shared_memory_bytes=region)
    try:
        ns = open_namespace(client, args, cfg)
        blocks_before = ns.blocks
        system = conversation_tokens(args.seed, SYSTEM, 0, 0, args.system_tokens, cfg.vocab)
        warm_tokens = conversation_tokens(args.seed, WARMUP, 0, 0, 64, cfg.vocab)

        # Warm-up, untimed: kernel selection, allocator pools, and the client's one-time
        # costs (its shared-memory region, created and pinned on first use; a GPU decoder,
        # made on its first block), through one block stored and fetched under a key no
        # prompt has, then deleted.
        warm = torch.tensor(warm_tokens, dtype=torch.long, device=device)
        _, kv = model.forward(warm)
        model.forward(warm[32:], [(k[:32], v[:32]) for k, v in kv], 32)
        warm_key = [b"chat-reuse-warmup"]
        client.put_many(ns.name, zip(warm_key, kvb.blocks(kv, 1)))
        kvb.fetch(client, ns.name, warm_key)
        client.delete(ns.name, warm_key)
        sync(device)

        history = [list(system) for _ in range(args.users)]
        turns = []
        for turn in range(args.turns):
            for user in range(args.users):
                prompt = history[user] + conversation_tokens(args.seed, MESSAGE, user, turn,
                                                             args.turn_tokens, cfg.vocab)
                rec, next_token = run_turn(model, kvb, client, ns.name, prompt, device,
                                           args.block_tokens)
                rec.update(user=user + 1, turn=turn + 1)
                turns.append(rec)
                # The reply starts with the recompute's token, so every codec sees the
                # same conversation; the rest stands in for decoding, which is not measured.
                history[user] = prompt + [next_token] + conversation_tokens(
                    args.seed, REPLY, user, turn, args.reply_tokens - 1, cfg.vocab)
        ns_after = client.namespace(ns.name)
        stats = client.stats()
    finally:
        client.close()

    tol = TOLERANCE[args.dtype]
    exact = args.codec == "none"
    for r in turns:
        r["within_tolerance"] = r["max_rel_err"] <= tol
        # A token flip needs an error of at least half the recompute's top-2 margin: with
        # the error within tolerance, a flip inside that margin is rounding, not the KV.
        r["ok"] = not exact or (r["within_tolerance"] and
                                (r["match"] or r["top2_margin"] <= 2 * r["max_abs_err"]))
    tot = lambda f: sum(r[f] for r in turns)  # noqa: E731
    totals = dict(
        prompt_tokens=tot("prompt_tokens"), tokens_reused=tot("tokens_reused"),
        blocks_looked_up=tot("blocks_looked_up"), blocks_hit=tot("blocks_hit"),
        blocks_put=tot("blocks_put"),
        ttft_full_ms=tot("ttft_full_ms"), ttft_kvstash_ms=tot("ttft_kvstash_ms"),
        restore_ms=tot("restore_ms"), prefill_ms=tot("prefill_ms"), put_ms=tot("put_ms"),
        matches=sum(r["match"] for r in turns), turns=len(turns),
        max_abs_err=max(r["max_abs_err"] for r in turns),
        max_rel_err=max(r["max_rel_err"] for r in turns))
    totals["token_hit_ratio"] = totals["tokens_reused"] / totals["prompt_tokens"]
    totals["block_hit_ratio"] = (totals["blocks_hit"] / totals["blocks_looked_up"]
                                 if totals["blocks_looked_up"] else 0.0)
    totals["ttft_speedup"] = totals["ttft_full_ms"] / totals["ttft_kvstash_ms"]
    paths = sorted({p for r in turns for p in (r["get_path"], r["put_path"]) if p})
    return dict(
        model=args.model, config=dataclasses.asdict(cfg), device=str(device),
        compute_dtype=args.dtype, kv_dtype=args.kv_dtype, codec=args.codec,
        restore=args.restore,
        target=args.target, namespace=ns.name, block_tokens=args.block_tokens,
        users=args.users, turns_per_user=args.turns, system_tokens=args.system_tokens,
        turn_tokens=args.turn_tokens, reply_tokens=args.reply_tokens, seed=args.seed,
        model_build_s=build_s, data_paths=paths, tolerance_rel=tol,
        ok=all(r["ok"] for r in turns), turns=turns, totals=totals,
        namespace_blocks_before=blocks_before, namespace_blocks=ns_after.blocks,
        namespace_stored_bytes=ns_after.stored_bytes, namespace_raw_bytes=ns_after.raw_bytes,
        daemon_tiers=stats["tiers"])


def print_report(s, out=sys.stdout):
    c = s["config"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"model {s['model']}: {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, "
      f"{c['kv_heads']} KV heads x {c['head_dim']}, vocab {c['vocab']} on {s['device']} "
      f"(compute {s['compute_dtype']}, KV {s['kv_dtype']}), built in {s['model_build_s']:.1f} s")
    p(f"kvstash {s['target']} namespace {s['namespace']} codec {s['codec']}, "
      f"{s['block_tokens']}-token blocks, restore {s['restore']}, data path "
      f"{', '.join(s['data_paths']) or '-'}")
    hdr = (f"{'user':>4} {'turn':>4} {'prompt':>6} {'reused':>6} {'blocks':>7} "
           f"{'TTFT full':>10} {'TTFT kvs':>9} {'restore':>8} {'prefill':>8} "
           f"{'next':>5} {'max|dlogit|':>11} {'rel':>8}")
    p(hdr)
    p("-" * len(hdr))
    for r in s["turns"]:
        p(f"{r['user']:>4} {r['turn']:>4} {r['prompt_tokens']:>6} {r['tokens_reused']:>6} "
          f"{r['blocks_hit']:>3}/{r['blocks_looked_up']:<3} {r['ttft_full_ms']:>8.1f}ms "
          f"{r['ttft_kvstash_ms']:>7.1f}ms {r['restore_ms']:>6.1f}ms {r['prefill_ms']:>6.1f}ms "
          f"{'same' if r['match'] else 'DIFF':>5} {r['max_abs_err']:>11.3g} "
          f"{r['max_rel_err']:>8.2g}")
    t = s["totals"]
    p("-" * len(hdr))
    p(f"{'all':>9} {t['prompt_tokens']:>6} {t['tokens_reused']:>6} "
      f"{t['blocks_hit']:>3}/{t['blocks_looked_up']:<3} {t['ttft_full_ms']:>8.1f}ms "
      f"{t['ttft_kvstash_ms']:>7.1f}ms {t['restore_ms']:>6.1f}ms {t['prefill_ms']:>6.1f}ms "
      f"{t['matches']:>2}/{t['turns']:<2} {t['max_abs_err']:>11.3g} {t['max_rel_err']:>8.2g}")
    p(f"reused {t['tokens_reused']} of {t['prompt_tokens']} prompt tokens "
      f"({100 * t['token_hit_ratio']:.1f}%), {t['blocks_hit']} of {t['blocks_looked_up']} "
      f"blocks looked up ({100 * t['block_hit_ratio']:.1f}%); TTFT {t['ttft_full_ms']:.1f} ms "
      f"-> {t['ttft_kvstash_ms']:.1f} ms ({t['ttft_speedup']:.2f}x) in total; "
      f"offload {t['blocks_put']} blocks in {t['put_ms']:.1f} ms (after the first token)")
    ratio = s["namespace_raw_bytes"] / s["namespace_stored_bytes"] if \
        s["namespace_stored_bytes"] else 0
    p(f"namespace now holds {s['namespace_blocks']} blocks ({s['namespace_blocks_before']} "
      f"before this run), {s['namespace_stored_bytes'] / 2**20:.1f} MiB stored for "
      f"{s['namespace_raw_bytes'] / 2**20:.1f} MiB of KV ({ratio:.2f}x)")
    if s["codec"] == "none":
        p(f"codec none: {'OK' if s['ok'] else 'FAILED'}: next token and logits must match the "
          f"full recompute within {s['tolerance_rel']:g} of the largest logit")
    else:
        p(f"codec {s['codec']} is lossy: {t['matches']}/{t['turns']} next tokens match, "
          f"logit error up to {t['max_rel_err']:.2g} of the largest logit (reported, not "
          f"checked)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--layers", type=int, default=0, help="override the model's layer count")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="compute dtype (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--kv-dtype", choices=["fp16", "bf16"], default=None,
                    help="KV cache and storage dtype (default: bf16 with --dtype bf16, else fp16)")
    ap.add_argument("--codec", default="none", help="key and value codec of the namespace")
    ap.add_argument("--restore", choices=["direct", "host"], default="direct",
                    help="direct: blocks land in device tensors (get_prefix out=); host: numpy "
                         "arrays copied to the device by the example (see KvBlocks)")
    ap.add_argument("--target", default=os.environ.get("KVSTASH_TARGET", "127.0.0.1:50051"))
    ap.add_argument("--token", default=os.environ.get("KVSTASH_TOKEN"),
                    help="bearer token, if the daemon wants one")
    ap.add_argument("--namespace", default=None,
                    help="default chat-<model>-<layers>L-<kv dtype>-<codec>-<hash of the "
                         "model's identity>")
    ap.add_argument("--fresh", action="store_true",
                    help="drop the namespace first (else a matching one is reused, warm)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the summary here")
    a = ap.parse_args(argv)
    if a.dtype is None:
        a.dtype = "fp16" if a.device == "cuda" else "fp32"
    if a.kv_dtype is None:
        a.kv_dtype = "bf16" if a.dtype == "bf16" else "fp16"
    if min(a.users, a.turns, a.turn_tokens, a.reply_tokens, a.block_tokens) < 1 or \
            a.system_tokens < 0:
        ap.error("--users, --turns, --turn-tokens, --reply-tokens and --block-tokens must be "
                 ">= 1, --system-tokens >= 0")
    if a.namespace is None:
        # Block keys name tokens, not weights: KV from another model (or seed, or compute
        # dtype) of the same layout would be restored without complaint, and be wrong. The
        # namespace is what names the model.
        layers = a.layers or MODELS[a.model].layers
        ident = repr((a.model, layers, a.seed, a.dtype, a.kv_dtype, a.block_tokens,
                      dataclasses.astuple(MODELS[a.model])))
        a.namespace = (f"chat-{a.model}-{layers}L-{a.kv_dtype}-{a.codec}-"
                       f"{hashlib.blake2b(ident.encode(), digest_size=4).hexdigest()}")
    return a


def main(argv=None):
    args = parse_args(argv)
    summary = run(args)
    print_report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The small byte-level Llama-style decoder of the perplexity harness (issue 16 item 1).

RMSNorm, rotary position embeddings (rotate-half, theta 10000, as shared/data's realkv
model), grouped-query attention (query head h reads kv-head h // (heads / kv_heads)),
SwiGLU MLP, untied embedding and output head, no biases. Vocabulary: the 256 byte values.

One class serves training (batched, causal, autograd) and evaluation with a KV cache:
forward(tokens, past, start) prefills `tokens` at positions start.. on top of `past`, the
cached keys/values of positions 0..start-1, as a serving engine's prefill of an uncached
suffix does. The cache holds fp16 numbers (kv_dtype), compute is fp32 (torch's CPU matmul
has no fp16), as client/python/examples/chat_reuse.py does.

Weights: tests/data/model/bytelm.npz (fp16), names as in Model.state_names(); load(path)."""
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    hidden: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 1408
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq: int = 512


def rope_tables(cfg, start, n, device=None):
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64,
                                                  device=device) / cfg.head_dim))
    pos = torch.arange(start, start + n, dtype=torch.float64, device=device)
    f = torch.outer(pos, inv)
    f = torch.cat([f, f], dim=-1)  # [n, D]
    return f.cos().float(), f.sin().float()


def apply_rope(x, cos, sin):
    """x [..., n, H, D] with cos/sin [n, D]: the rotate-half convention."""
    h = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    return x * c + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * s


class RMSNorm(torch.nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.hidden, c.norm_eps)
        self.wq = torch.nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.wk = torch.nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.wv = torch.nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.wo = torch.nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden, c.norm_eps)
        self.w_gate = torch.nn.Linear(c.hidden, c.intermediate, bias=False)
        self.w_up = torch.nn.Linear(c.hidden, c.intermediate, bias=False)
        self.w_down = torch.nn.Linear(c.intermediate, c.hidden, bias=False)


class Model(torch.nn.Module):
    def __init__(self, cfg=Config()):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = torch.nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens, past=None, start=0, kv_dtype=None, keep_kv=False,
                queries=False):
        """tokens [B, n] (long) at positions start..start+n-1; past: per layer (K, V)
        [B, start, H_kv, D], keys after RoPE, or None when start is 0.
        kv_dtype: round K/V to it as they enter the cache (None: training, no rounding).
        Returns logits [B, n, vocab] (fp32) and, with keep_kv, per layer a dict of the new
        tokens' 'k' (post-RoPE), 'k_pre' (pre-RoPE), 'v' in kv_dtype, plus 'q' (post-RoPE
        queries, [B, n, heads, D]) with queries=True."""
        c = self.cfg
        B, n = tokens.shape
        cos, sin = rope_tables(c, start, n, tokens.device)
        rep = c.heads // c.kv_heads
        x = self.embed(tokens)
        kept = []
        if past is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)
        else:
            s = start + n
            mask = (torch.arange(s, device=tokens.device)[None, :] >
                    torch.arange(start, s, device=tokens.device)[:, None])
        for i, b in enumerate(self.blocks):
            h = b.attn_norm(x)
            q = apply_rope(b.wq(h).view(B, n, c.heads, c.head_dim), cos, sin)
            k_pre = b.wk(h).view(B, n, c.kv_heads, c.head_dim)
            k = apply_rope(k_pre, cos, sin)
            v = b.wv(h).view(B, n, c.kv_heads, c.head_dim)
            if kv_dtype is not None:
                # The cache holds kv_dtype: restored and recomputed KV are the same kind
                # of numbers, and attention reads them back in fp32.
                k, v = k.to(kv_dtype), v.to(kv_dtype)
            if keep_kv:
                d = dict(k=k, v=v, k_pre=k_pre.to(kv_dtype) if kv_dtype else k_pre)
                if queries:
                    d["q"] = q
                kept.append(d)
            if past is not None:
                k = torch.cat([past[i][0].to(k.dtype), k], dim=1)
                v = torch.cat([past[i][1].to(v.dtype), v], dim=1)
            k, v = k.float(), v.float()
            # [B, H, n, D] @ [B, H, D, s]; kv-head j serves query heads j*rep..j*rep+rep-1.
            qh = q.transpose(1, 2)
            kh = k.repeat_interleave(rep, dim=2).transpose(1, 2)
            vh = v.repeat_interleave(rep, dim=2).transpose(1, 2)
            scores = (qh @ kh.transpose(-1, -2)) * c.head_dim ** -0.5
            scores = scores.masked_fill(mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ vh
            x = x + b.wo(o.transpose(1, 2).reshape(B, n, c.heads * c.head_dim))
            h = b.mlp_norm(x)
            x = x + b.w_down(F.silu(b.w_gate(h)) * b.w_up(h))
        logits = self.lm_head(self.norm(x)).float()
        return (logits, kept) if keep_kv else logits


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def save(model, path, meta=None):
    """fp16 weights and the config (JSON in the array '__config__') in one .npz."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float16)
              for k, v in model.state_dict().items()}
    info = dict(config=dataclasses.asdict(model.cfg), **(meta or {}))
    arrays["__config__"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def load(path):
    """(Model in fp32 with the fp16 weights, eval mode, no grad; the metadata dict)."""
    z = np.load(path)
    info = json.loads(bytes(z["__config__"]).decode())
    model = Model(Config(**info["config"]))
    state = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k != "__config__"}
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info

"""End-to-end quality of kvstash's codecs: perplexity with the KV cache restored from the
daemon (issue 16 item 2).

For every held-out window of W tokens (bytes) the trained model of model.py prefills the
first P tokens (the prompt's cached prefix, P = 16 * --prefix-blocks), and its KV cache is
put into a kvstashd namespace of each codec as 16-token blocks (`put_many` of the Python
package, chained block keys of the tokens), read back with `get_prefix`, and the remaining
W - P tokens are prefilled on top of the restored KV, as a serving engine does with a
prefix-cache hit. Over the suffix's W - P - 1 next-token predictions it reports:
  ppl      exp(mean next-token cross-entropy), and dppl = ppl - ppl of the reference,
           with its standard error over windows (paired: the same windows under both);
  KL       mean KL(reference || restored) of the next-token distributions, nats;
  agree    share of positions whose top token is the reference's;
  acc      share of positions whose top token is the true next byte;
  bits     every encoded byte the daemon reports for the evaluated blocks (PutResult
           .encoded_bytes: block header, section table, checksums, sections) * 8 / elements,
           and the same as bytes per token (all layers, K and V);
  attn out, logits, K rel, V rel  the attention-output, attention-logit and K/V relative
           errors of the restored prefix itself, measured as tests/bench/quality.c does
           (prefix queries, causal, 1/sqrt(D); per layer over all windows, then the mean
           over layers), so the end-to-end order can be compared with the proxy's order on
           the same KV.
The reference is the same prefill with the prefix KV kept locally (fp16 cache, no kvstash):
codec `none` must reproduce it bit for bit (checked: the restored bytes and the logits).

Codecs: every codec the daemon offers (the list in its answer to an unknown codec name).
  - rotatekv-*: the namespace stores PRE-RoPE keys (`keys_pre_rope`; quantizers.md: the
    paper rotates pre-RoPE keys); the client applies RoPE to the restored keys (fp32,
    rounded to the fp16 cache) before the suffix prefill. The daemon calibrates the channel
    order from the first --calib-tokens key tokens put into a namespace: those are the KV of
    tests/data/model/calib.txt (its own split, never evaluated), put first; the harness
    checks that the state was frozen (key_state_version 1) before the evaluated blocks.
    --post-rope adds rotatekv rows on post-RoPE keys (calibrated the same way), and a
    `none` row with pre-RoPE keys (the cost of re-applying RoPE to an fp16 key: the
    rounding only).
  - squat-*: the query subspace is the prompt's own: for each window a fresh namespace gets
    the prefix's post-RoPE queries (KvAdmin.AddQueries over gRPC: the Python package has no
    call for it, so the messages are generated from proto/ with protoc, as the integration
    tests do), then the prefix blocks. Without protoc the rows run without queries (then
    SQuat is KIVI) and say so.
  - others: post-RoPE keys, what a serving engine caches.

Tier policies (--policies, precision demotion: issue 16 item 5): each policy is
OWN[/HOST[/DISK]], the namespace's own codec (the GPU tier's, where Puts land) and the codecs
of its host and disk tiers (README "Namespace options"; empty: a block keeps its encoding).
The daemon gets a disk tier; every window's prefix blocks are put (on a CPU daemon they land in
the host tier: encoded with HOST where it is colder than OWN), moved to the disk tier by an
operator's Evict (re-encoded with DISK where colder), and read back from there: the row is the
quality of the policy's coldest tier, the worst a prefix hit sees. blocks/GiB is read from
the daemon's byte counters (NamespaceInfo.stored_bytes over its blocks, after the moves);
bits/value from them too. Without --codecs, only the policies run.

    /usr/bin/python3 tests/bench/ppl/ppl_bench.py --kvstashd build/bin/kvstashd \
        --windows 8 --window 160 --prefix-blocks 8 --no-proxy \
        --policies fp8,fp8/kivi-4/kivi-2,fp8//kivi-2,kivi-2,fp8//rotatekv-2

    # a daemon is started on a Unix socket from the build tree (or --target ADDR); half of
    # each window restored (RESULTS.md's table A), then nearly all of it (table B):
    /usr/bin/python3 tests/bench/ppl/ppl_bench.py --kvstashd build/bin/kvstashd \\
        --windows 128 --post-rope
    /usr/bin/python3 tests/bench/ppl/ppl_bench.py --kvstashd build/bin/kvstashd \\
        --windows 192 --prefix-blocks 30 --no-proxy

Exit status 1 when --check fails (CI: see check()), 77 without torch."""
import argparse
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # Debian's python3-torch; deploy/dev.sh installs it
    if __name__ == "__main__":
        print("ppl_bench: torch is not installed: skipped", file=sys.stderr)
        sys.exit(77)
    raise

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "client", "python"))
if "KVSTASH_LIB" not in os.environ:  # a build tree of this checkout (the package looks in
    for _lib in [os.path.join(REPO, "build", "lib", "libkvstash.so.0")] + sorted(
            glob.glob(os.path.join(REPO, "build*", "lib", "libkvstash.so.0"))):
        if os.path.exists(_lib):  # build/ only); build/ first ("build-asan" sorts before it)
            os.environ["KVSTASH_LIB"] = _lib
            break
import model as lm  # noqa: E402
import kvstash  # noqa: E402

DATA = os.path.join(REPO, "tests", "data", "model")
BT = 16
FP16 = torch.float16
# The codecs of gpu/codec/codec.c, used only if the daemon's list cannot be read.
FALLBACK_CODECS = ["none", "fp8", "kivi-2", "kivi-3", "kivi-4", "polarquant", "rotatekv-2",
                   "rotatekv-3", "rotatekv-4", "squat-2", "squat-4"]


# ----------------------------------------------------------------------------- daemon, wire


def _die_with_parent():
    """In the daemon before exec: SIGKILL it if this process dies first (Linux), so no
    daemon outlives an interrupted run."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Daemon:
    """kvstashd on a Unix socket in a temporary directory; stopped by SIGTERM to its pid."""

    def __init__(self, binary, calib_tokens, extra=(), host_capacity="2G", disk=False):
        self.dir = tempfile.mkdtemp(prefix="kvs-ppl-")
        sock = os.path.join(self.dir, "kvs.sock")
        self.target = "unix:" + sock
        self.err = open(os.path.join(self.dir, "stderr"), "wb")
        tiers = ["--data-dir", os.path.join(self.dir, "data"), "--disk-capacity", "4G",
                 "--flush-on-exit", "off"] if disk else []
        self.proc = subprocess.Popen(
            [binary, "--listen", self.target, "--host-capacity", host_capacity,
             "--log-level", "warn", "--calib-tokens", str(calib_tokens), *tiers, *extra],
            stdout=self.err, stderr=self.err, preexec_fn=_die_with_parent)
        for _ in range(400):
            if os.path.exists(sock) or self.proc.poll() is not None:
                break
            time.sleep(0.025)
        if self.proc.poll() is not None or not os.path.exists(sock):
            self.stop()
            raise RuntimeError(f"kvstashd did not start: {self.stderr()}")

    def stderr(self):
        with open(os.path.join(self.dir, "stderr"), errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        rc = self.proc.returncode
        text = self.stderr()
        shutil.rmtree(self.dir, ignore_errors=True)
        if rc != 0:
            raise RuntimeError(f"kvstashd exited with {rc}: {text}")


class Wire:
    """KvAdmin.AddQueries and GetNamespace through grpcio, with messages generated from
    proto/ (the Python package has no call for query samples). Loaded under a private
    module name so that it cannot shadow the `kvstash` client package."""

    def __init__(self, target, pb=None):
        import grpc
        self.tmp = tempfile.mkdtemp(prefix="kvs-ppl-proto-")
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 256 << 20)])
        if pb is None:
            self.pb = self._generate()
        else:  # the caller's (the integration tests' kvs.pb): one copy of the proto file
            self.pb = pb
        call = lambda m, req, rep: self.channel.unary_unary(  # noqa: E731
            f"/kvstash.v1.KvAdmin/{m}", request_serializer=req.SerializeToString,
            response_deserializer=rep.FromString)
        self._add = call("AddQueries", self.pb.AddQueriesRequest, self.pb.NamespaceInfo)
        self._get_ns = call("GetNamespace", self.pb.NameRequest, self.pb.NamespaceInfo)
        self._evict = call("Evict", self.pb.EvictRequest, self.pb.EvictReply)

    def _generate(self):
        # Messages generated beforehand (KVS_PB_DIR, as the integration tests take them: the
        # GPU machine has no protoc), else generated here.
        gen = os.environ.get("KVS_PB_DIR")
        if not gen:
            proto_dir = os.environ.get("KVS_PROTO_DIR", os.path.join(REPO, "proto"))
            src = os.path.join(proto_dir, "kvstash", "v1", "kvstash.proto")
            r = subprocess.run(["protoc", f"-I{proto_dir}", f"--python_out={self.tmp}", src],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"protoc: {r.stderr}")
            gen = self.tmp
        spec = importlib.util.spec_from_file_location(
            "kvs_ppl_wire_pb2", os.path.join(gen, "kvstash", "v1", "kvstash_pb2.py"))
        pb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pb)
        return pb

    def add_queries(self, ns, q):
        """q: [L][tokens][query_heads][D] fp16. Returns the namespace's key state version."""
        info = self._add(self.pb.AddQueriesRequest(namespace=ns, query_heads=q.shape[2],
                                                   tokens=q.shape[1], queries=q.tobytes()),
                         timeout=60)
        return info.key_state_version

    def key_state_version(self, ns):
        return self._get_ns(self.pb.NameRequest(name=ns), timeout=30).key_state_version

    def to_disk(self, ns, keys):
        """KvAdmin.Evict of keys to the disk tier (it returns once the disk writer wrote
        them); the number moved."""
        rep = self._evict(self.pb.EvictRequest(namespace=ns, keys=keys,
                                                to=self.pb.EvictRequest.TARGET_DISK), timeout=120)
        return rep.moved

    def close(self):
        self.channel.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def daemon_codecs(client, cfg):
    """The codec names the daemon accepts, from its answer to an unknown one."""
    try:
        client.create_namespace("ppl-codec-probe", cfg.layers, cfg.kv_heads, cfg.head_dim, BT,
                                key_codec="?", value_codec="?")
    except kvstash.KvstashError as e:
        m = re.search(r"available: ([^)]*)\)", str(e))
        if m:
            return [c.strip() for c in m.group(1).split(",") if c.strip()]
    else:
        client.drop_namespace("ppl-codec-probe")
    return list(FALLBACK_CODECS)


def find_kvstashd():
    for p in [os.environ.get("KVSTASHD", ""), os.path.join(REPO, "build", "bin", "kvstashd")] + \
            sorted(glob.glob(os.path.join(REPO, "build*", "bin", "kvstashd"))):
        if p and os.access(p, os.X_OK):
            return p
    raise SystemExit("no kvstashd: pass --kvstashd PATH or --target ADDR")


# ----------------------------------------------------------------------------- the model side


def load_windows(path, n, width):
    raw = np.fromfile(path, dtype=np.uint8)
    w = raw[:len(raw) // 512 * 512].reshape(-1, 512)[:, :width]
    if n:
        w = w[:n]
    return torch.from_numpy(w.astype(np.int64))


@dataclasses.dataclass
class Prefix:
    """One batch of windows' prefix KV as the model cached it: [B, L, P, H, D] fp16 each,
    queries [B, L, P, heads, D] fp16 (post-RoPE)."""
    k: torch.Tensor
    k_pre: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor


def prefill_prefix(model, tokens):
    _, kept = model(tokens, kv_dtype=FP16, keep_kv=True, queries=True)
    st = lambda f: torch.stack([d[f] for d in kept], dim=1)  # noqa: E731
    return Prefix(st("k"), st("k_pre"), st("v"), st("q").to(FP16))


def to_blocks(k, v):
    """k, v [L, P, H, D] (one window) -> P/16 blocks [L][2][16][H][D] as numpy fp16."""
    L, P, H, D = k.shape
    kv = torch.stack([k, v], dim=1).reshape(L, 2, P // BT, BT, H, D)
    kv = kv.permute(2, 0, 1, 3, 4, 5).contiguous().numpy()
    return [kv[i] for i in range(P // BT)]


def from_blocks(blocks):
    """Restored blocks -> (k, v) [L, P, H, D] fp16 tensors."""
    kv = torch.from_numpy(np.concatenate([np.asarray(b) for b in blocks], axis=2))
    return kv[:, 0], kv[:, 1]


def rope_keys(cfg, k_pre):
    """RoPE on restored pre-RoPE keys [L, P, H, D] fp16: fp32 math, rounded to the cache."""
    cos, sin = lm.rope_tables(cfg, 0, k_pre.shape[1])
    return lm.apply_rope(k_pre.float(), cos, sin).to(FP16)


def suffix_scores(model, suffix, past, start):
    """Log-probabilities [B, S-1, vocab] of the suffix positions that have a next token."""
    logits = model(suffix, past=past, start=start, kv_dtype=FP16)
    return F.log_softmax(logits[:, :-1].double(), dim=-1)


class AttnErr:
    """quality.c's measures on the prefix: per layer, sums of squared errors and of squared
    references over all windows; K rel, V rel, attention logits (qK^T over the causal
    entries) and attention output."""

    def __init__(self, layers):
        self.acc = np.zeros((layers, 8))

    def add(self, cfg, q, k, v, k_hat, v_hat):
        """One window: q [L, P, heads, D], the rest [L, P, H, D] (post-RoPE keys). fp32
        (quality.c uses double; fp32 is far finer than any codec's error here, and codec
        none still measures 0: the same numbers go through the same operations)."""
        L, P, heads, D = q.shape
        H = cfg.kv_heads
        # Query head h reads kv-head h // rep: [L, H, rep*P, D] against [L, H, P, D].
        qg = q.float().view(L, P, H, heads // H, D).permute(0, 2, 3, 1, 4).reshape(
            L, H, -1, D)
        mask = torch.ones(P, P, dtype=torch.bool).triu(1).repeat(heads // H, 1)

        def attn(kk, vv):
            kk, vv = kk.float().transpose(1, 2), vv.float().transpose(1, 2)
            s = (qg @ kk.transpose(-1, -2)).masked_fill(mask, 0.0)
            p = torch.softmax((s * D ** -0.5).masked_fill(mask, float("-inf")), -1)
            return s, p @ vv

        (s, o), (sh, oh) = attn(k, v), attn(k_hat, v_hat)
        sq = lambda x: x.double().pow(2).flatten(1).sum(1).numpy()  # noqa: E731
        self.acc += np.stack([sq(k_hat.float() - k.float()), sq(k.float()),
                              sq(v_hat.float() - v.float()), sq(v.float()),
                              sq(sh - s), sq(s), sq(oh - o), sq(o)], axis=1)

    def result(self):
        a = self.acc
        if not a.any():  # --no-proxy
            return dict(k_rel=float("nan"), v_rel=float("nan"), logits=float("nan"),
                        attn_out=float("nan"))
        r = lambda i: float(np.mean(np.sqrt(a[:, i] / a[:, i + 1])))  # noqa: E731
        return dict(k_rel=r(0), v_rel=r(2), logits=r(4), attn_out=r(6))


# ----------------------------------------------------------------------------- one codec


@dataclasses.dataclass
class Variant:
    codec: str
    pre_rope: bool      # the namespace holds pre-RoPE keys; RoPE re-applied after Get
    queries: bool       # SQuat: the prompt's queries through AddQueries, per window
    calibrate: bool     # RotateKV: calibration KV put first
    host: str = ""      # a tier policy (--policies): the host and disk tiers' codecs; its
    disk: str = ""      # blocks are moved to the disk tier before they are read back
    policy: bool = False

    @property
    def label(self):
        if self.policy:
            return policy_name(self)
        return self.codec + (" (pre-RoPE K)" if self.pre_rope else "")


def policy_name(v):
    return " → ".join([v.codec] + [f"{t} {c}" for t, c in (("host", v.host),
                                                            ("disk", v.disk)) if c])


def parse_policies(text):
    """OWN[/HOST[/DISK]],... -> Variants (a policy moves its blocks to disk)."""
    out = []
    for p in [x for x in text.split(",") if x]:
        parts = (p.split("/") + ["", ""])[:3]
        own, host, disk = parts
        rot = own.startswith("rotatekv")
        out.append(Variant(own, pre_rope=rot, queries=False, calibrate=rot, host=host,
                           disk=disk, policy=True))
    return out


def variants(codecs, post_rope_rows, have_wire):
    out = []
    for c in codecs:
        rot, sq = c.startswith("rotatekv"), c.startswith("squat")
        out.append(Variant(c, pre_rope=rot, queries=sq and have_wire, calibrate=rot))
    if post_rope_rows:
        out.append(Variant("none", pre_rope=True, queries=False, calibrate=False))
        out += [Variant(c, pre_rope=False, queries=False, calibrate=True)
                for c in codecs if c.startswith("rotatekv")]
    return out


class Bench:
    def __init__(self, args):
        self.a = args
        self.model, self.info = lm.load(args.weights)
        self.cfg = self.model.cfg
        self.P = BT * args.prefix_blocks
        self.win = load_windows(args.heldout, args.windows, args.window)
        if self.P >= args.window - 1:
            raise SystemExit("--prefix-blocks leaves no suffix to score")
        self.calib_tokens = args.calib_tokens
        self.run_id = f"{os.getpid()}-{int(time.time())}"

    # -- the reference: prefix KV cached locally
    def reference(self):
        t0 = time.time()
        self.prefix, self.ref = [], []
        for i in range(0, len(self.win), self.a.batch):
            w = self.win[i:i + self.a.batch]
            pre = prefill_prefix(self.model, w[:, :self.P])
            past = [(pre.k[:, l], pre.v[:, l]) for l in range(self.cfg.layers)]
            self.prefix.append(pre)
            self.ref.append(suffix_scores(self.model, w[:, self.P:], past, self.P))
        self.ref_s = time.time() - t0

    def calibration_blocks(self, pre_rope):
        """The KV of calib.txt, WINDOW tokens at a time, as ([keys], [blocks]) covering at
        least calib_tokens tokens."""
        if not hasattr(self, "_calib"):
            n = -(-self.calib_tokens // BT) * BT
            raw = np.fromfile(self.a.calib, dtype=np.uint8)
            if len(raw) < n:
                raise SystemExit(f"{self.a.calib}: {len(raw)} bytes, need {n}")
            toks = torch.from_numpy(raw[:n].astype(np.int64))
            # Windows of 512 tokens (the trained length), the last one shorter.
            self._calib = [(t[None], prefill_prefix(self.model, t[None]))
                           for t in toks.split(512)]
        keys, blocks = [], []
        for toks, pre in self._calib:
            keys += kvstash.block_keys(toks[0].tolist(), BT)
            blocks += to_blocks(pre.k_pre[0] if pre_rope else pre.k[0], pre.v[0])
        return keys, blocks

    def run_variant(self, client, wire, var):
        cfg, a = self.cfg, self.a
        stamp = re.sub(r"[^a-z0-9-]", "", var.label.replace(" ", "-").lower())
        base = f"ppl-{stamp}-{self.run_id}"
        kw = dict(key_codec=var.codec, value_codec=var.codec, keys_pre_rope=var.pre_rope,
                  seed=a.seed, host_codec=var.host, disk_codec=var.disk)
        state_version = None

        def new_ns(name):
            client.create_namespace(name, cfg.layers, cfg.kv_heads, cfg.head_dim, BT, **kw)
            return name

        shared = None
        if not var.queries:
            shared = new_ns(base)
            if var.calibrate:
                keys, blocks = self.calibration_blocks(var.pre_rope)
                put_all(client, shared, keys, blocks)
                if wire:
                    state_version = wire.key_state_version(shared)
                    if state_version < 1:
                        raise RuntimeError(
                            f"{var.label}: channel order not calibrated after "
                            f"{len(blocks) * BT} tokens (daemon --calib-tokens above "
                            f"{self.calib_tokens}?)")
        t0 = time.time()
        nll = kl = agree = acc = n = 0.0
        win_nll, win_kl = [], []  # per window, summed over its positions
        enc = raw_elems = 0
        exact = True
        err = AttnErr(cfg.layers)
        wi = 0
        for bi, pre in enumerate(self.prefix):
            B = pre.k.shape[0]
            restored = []
            for j in range(B):
                tokens = self.win[wi + j, :self.P].tolist()
                keys = kvstash.block_keys(tokens, BT)
                ns = shared
                if var.queries:
                    ns = new_ns(f"{base}-w{wi + j}")
                    q = pre.q[j] if a.squat_query_scale == 1.0 else \
                        (pre.q[j].float() * a.squat_query_scale).to(FP16)
                    state_version = wire.add_queries(ns, q.numpy())
                blocks = to_blocks(pre.k_pre[j] if var.pre_rope else pre.k[j], pre.v[j])
                res = put_all(client, ns, keys, blocks)
                enc += sum(r.encoded_bytes for r in res)
                raw_elems += len(blocks) * blocks[0].size
                if var.policy:  # down to the coldest tier before the read
                    moved = wire.to_disk(ns, keys)
                    if moved != len(keys):
                        raise RuntimeError(f"{var.label}: {moved} of {len(keys)} blocks to disk")
                got = client.get_prefix(ns, keys)
                if len(got) != len(keys):
                    raise RuntimeError(f"{var.label}: {len(got)} of {len(keys)} blocks back")
                if var.codec == "none":
                    exact &= all(np.array_equal(x, y) for x, y in zip(got, blocks))
                k_hat, v_hat = from_blocks(got)
                if var.queries:
                    client.drop_namespace(ns)
                if var.pre_rope:
                    k_hat = rope_keys(cfg, k_hat)
                restored.append((k_hat, v_hat))
                if not a.no_proxy:
                    err.add(cfg, pre.q[j], pre.k[j], pre.v[j], k_hat, v_hat)
            past = [(torch.stack([r[0][l] for r in restored]),
                     torch.stack([r[1][l] for r in restored])) for l in range(cfg.layers)]
            w = self.win[wi:wi + B]
            lp = suffix_scores(self.model, w[:, self.P:], past, self.P)
            ref = self.ref[bi]
            if var.codec == "none" and not var.pre_rope:
                exact &= torch.equal(lp, ref)
            tgt = w[:, self.P + 1:]
            wn = -lp.gather(-1, tgt[..., None])[..., 0].sum(1)
            wk = (ref.exp() * (ref - lp)).sum((1, 2))
            win_nll += wn.tolist()
            win_kl += wk.tolist()
            nll += wn.sum().item()
            kl += wk.sum().item()
            top = lp.argmax(-1)
            agree += (top == ref.argmax(-1)).sum().item()
            acc += (top == tgt).sum().item()
            n += tgt.numel()
            wi += B
        stored = None
        if shared:
            if var.policy:  # what the daemon holds once every block moved down
                info = client.namespace(shared)
                stored = (info.stored_bytes, info.blocks, info.raw_bytes)
            client.drop_namespace(shared)
        if stored:  # the byte counters' view of the evaluated blocks
            enc, raw_elems = stored[0], stored[2] // 2
        row = dict(codec=var.codec, label=var.label, keys="pre-RoPE" if var.pre_rope else
                   "post-RoPE", queries=var.queries, state_version=state_version,
                   policy=var.policy, host=var.host, disk=var.disk,
                   blocks_per_gib=stored[1] * (1 << 30) / stored[0] if stored else None,
                   bits=8.0 * enc / raw_elems, bytes_per_token=enc / (raw_elems / (
                       2 * cfg.layers * cfg.kv_heads * cfg.head_dim)),
                   ppl=math.exp(nll / n), kl=kl / n, agree=agree / n, acc=acc / n,
                   positions=int(n), seconds=time.time() - t0, win_nll=win_nll,
                   win_kl=win_kl, **err.result())
        if var.codec == "none":
            row["exact"] = bool(exact)
        return row

    def run(self, client, wire, codecs):
        self.reference()
        ref_nll = ref_acc = n = 0.0
        ref_win = []
        for bi, ref in enumerate(self.ref):
            w = self.win[bi * self.a.batch:bi * self.a.batch + ref.shape[0]]
            tgt = w[:, self.P + 1:]
            wn = -ref.gather(-1, tgt[..., None])[..., 0].sum(1)
            ref_win += wn.tolist()
            ref_nll += wn.sum().item()
            ref_acc += (ref.argmax(-1) == tgt).sum().item()
            n += tgt.numel()
        ref_ppl = math.exp(ref_nll / n)
        rows = []
        todo = variants(codecs, self.a.post_rope, wire is not None) if codecs else []
        todo += parse_policies(self.a.policies or "")
        for var in todo:
            row = self.run_variant(client, wire, var)
            row["dppl"] = row["ppl"] - ref_ppl
            # Standard error of dppl over windows (paired: each window's mean NLL change;
            # dppl ~ ppl * dNLL for small changes), and of KL.
            per = n / len(ref_win)
            d = (np.array(row["win_nll"]) - np.array(ref_win)) / per
            row["dppl_se"] = ref_ppl * float(d.std(ddof=1) / math.sqrt(len(d))) \
                if len(d) > 1 else float("nan")
            k = np.array(row["win_kl"]) / per
            row["kl_se"] = float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else \
                float("nan")
            rows.append(row)
            if self.a.verbose:
                print(format_row(row), file=sys.stderr, flush=True)
        return dict(ref_ppl=ref_ppl, ref_acc=ref_acc / n, ref_seconds=self.ref_s, rows=rows)


def put_all(client, ns, keys, blocks):
    res = client.put_many(ns, zip(keys, blocks))
    bad = [r for r in res if isinstance(r, kvstash.KvstashError)]
    if bad:
        raise bad[0]
    return res


# ----------------------------------------------------------------------------- report


HEADER = ("| codec | keys stored | bits/value | bytes/token | ppl | Δppl ± SE | KL (nats) | "
          "agree % | acc % | attn out | logits | K rel | V rel |")


POLICY_HEADER = ("| policy (GPU → host → disk) | blocks/GiB | bits/value | bytes/token | ppl | "
                 "Δppl ± SE | KL (nats) | agree % | acc % |")


def format_policy(r):
    return (f"| {policy_name(Variant(r['codec'], False, False, False, r['host'], r['disk']))} | "
            f"{r['blocks_per_gib']:.0f} | {r['bits']:.3f} | {r['bytes_per_token']:.0f} | "
            f"{r['ppl']:.4f} | {r['dppl']:+.4f} ± {r['dppl_se']:.4f} | {r['kl']:.4f} | "
            f"{100 * r['agree']:.2f} | {100 * r['acc']:.2f} |")


def format_row(r):
    if r.get("policy"):
        return format_policy(r)
    f = lambda x: "—" if math.isnan(x) else f"{x:.4f}"  # noqa: E731  (--no-proxy)
    return (f"| {r['codec']} | {r['keys']}{' + prompt queries' if r['queries'] else ''} | "
            f"{r['bits']:.3f} | {r['bytes_per_token']:.0f} | {r['ppl']:.4f} | "
            f"{r['dppl']:+.4f} ± {r['dppl_se']:.4f} | {r['kl']:.4f} | "
            f"{100 * r['agree']:.2f} | {100 * r['acc']:.2f} | {f(r['attn_out'])} | "
            f"{f(r['logits'])} | {f(r['k_rel'])} | {f(r['v_rel'])} |")


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def report(s, out=sys.stdout):
    p = lambda *x: print(*x, file=out)  # noqa: E731
    c = s["model"]["config"]
    p(f"model {s['weights']}: {c['layers']} layers, hidden {c['hidden']}, {c['heads']} query "
      f"heads, {c['kv_heads']} KV heads x {c['head_dim']}, byte vocabulary; "
      f"{s['windows']} held-out windows of {s['window']} tokens: prefix {s['prefix']} "
      f"tokens ({s['prefix'] // BT} blocks) from kvstash, {s['window'] - s['prefix']} "
      f"prefilled, {s['rows'][0]['positions']} scored positions")
    p(f"reference (prefix KV kept locally in fp16): ppl {s['ref_ppl']:.4f}, "
      f"top-1 accuracy {100 * s['ref_acc']:.2f}%")
    plain = [r for r in s["rows"] if not r.get("policy")]
    policies = [r for r in s["rows"] if r.get("policy")]
    if plain:
        p("")
        p(HEADER)
        p("|" + "---|" * HEADER.count(" | ") + "---|")
        for r in plain:
            p(format_row(r))
    if policies:
        p("")
        p(POLICY_HEADER)
        p("|" + "---|" * POLICY_HEADER.count(" | ") + "---|")
        for r in policies:
            p(format_policy(r))
    main = [r for r in plain if r["codec"] != "none" and
            (r["keys"] == "pre-RoPE") == r["codec"].startswith("rotatekv")]
    if len(main) > 2 and not math.isnan(main[0]["attn_out"]):
        p("")
        col = lambda f: [r[f] for r in main]  # noqa: E731
        p(f"Spearman rank correlation over the {len(main)} lossy codecs: dppl vs attn out "
          f"{spearman(col('dppl'), col('attn_out')):.3f}, vs logits "
          f"{spearman(col('dppl'), col('logits')):.3f}, vs KL "
          f"{spearman(col('dppl'), col('kl')):.3f}; KL vs attn out "
          f"{spearman(col('kl'), col('attn_out')):.3f}, vs logits "
          f"{spearman(col('kl'), col('logits')):.3f}")
    for r in s["rows"]:
        if r["codec"].startswith("squat") and not r["queries"]:
            p(f"note: {r['label']} ran without query samples (no protoc/grpcio): it is KIVI")


def check(s, max_rel):
    """CI's tolerance (--check): codec none reproduces the local cache bit for bit (restored
    bytes and every log-probability); every row's ppl is finite and within max_rel of the
    reference's; a lossy codec really changed the output (KL > 0: its logits came from
    decoded blocks); RotateKV's channel order was calibrated (state version 1) and SQuat's
    namespaces got the prompt's queries (a state version) where the wire was there.
    Returns the failures (empty: passed)."""
    errors = []
    bound = max_rel * s["ref_ppl"]
    for r in s["rows"]:
        lossy = r["codec"] != "none" or bool(r.get("host") or r.get("disk"))
        if not lossy and r["keys"] == "post-RoPE":
            if not r.get("exact") or r["dppl"] != 0.0 or r["agree"] != 1.0:
                errors.append(f"none is not exact: {r}")
        if not math.isfinite(r["dppl"]) or abs(r["dppl"]) > bound:
            errors.append(f"{r['label']}: dppl {r['dppl']} not finite or beyond {bound:.4g} "
                          f"({max_rel} of the reference ppl)")
        if lossy and not r["kl"] > 0:
            errors.append(f"{r['label']}: KL {r['kl']}: the output did not change")
        if r["state_version"] is not None and r["state_version"] < 1:
            errors.append(f"{r['label']}: no codec state (version {r['state_version']})")
    return errors


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=os.path.join(DATA, "bytelm.npz"))
    ap.add_argument("--heldout", default=os.path.join(DATA, "heldout.txt"))
    ap.add_argument("--calib", default=os.path.join(DATA, "calib.txt"))
    ap.add_argument("--windows", type=int, default=96, help="held-out windows (0: all)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (<= 512)")
    ap.add_argument("--prefix-blocks", type=int, default=16,
                    help="16-token blocks of each window restored from kvstash")
    ap.add_argument("--codecs", default=None,
                    help="comma-separated, or 'all' (every codec the daemon offers; the "
                    "default without --policies)")
    ap.add_argument("--policies", default=None, metavar="OWN[/HOST[/DISK]],...",
                    help="tier policies (precision demotion): the own codec and the host and "
                    "disk tiers' codecs; each row's blocks are moved to the disk tier before "
                    "they are read (the daemon gets a disk tier)")
    ap.add_argument("--post-rope", action="store_true",
                    help="also rotatekv on post-RoPE keys, and none with pre-RoPE keys")
    ap.add_argument("--kvstashd", default=None, help="daemon binary to start")
    ap.add_argument("--target", default=None, help="use a running daemon instead; its "
                    "--calib-tokens must equal this --calib-tokens")
    ap.add_argument("--calib-tokens", type=int, default=4096,
                    help="RotateKV calibration tokens (the daemon's --calib-tokens)")
    ap.add_argument("--seed", type=int, default=1, help="namespace seed")
    ap.add_argument("--squat-query-scale", type=float, default=1.0,
                    help="diagnostic: multiply the queries sent to SQuat namespaces (their "
                    "Gram scales by its square; since the codec normalizes lambda by the "
                    "Gram's trace, a power of two leaves the codes unchanged unless it makes "
                    "fp16 queries subnormal)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-proxy", action="store_true",
                    help="skip the K/V/logit/attention-output errors (long prefixes: they "
                    "cost more than the rest)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--check", action="store_true", help="exit 1 unless none is exact, "
                    "every dppl is finite and within --max-rel of the reference ppl, ... "
                    "(see check())")
    ap.add_argument("--max-rel", type=float, default=0.15)
    ap.add_argument("--daemon-args", default="",
                    help="extra kvstashd flags, e.g. '--gpu on' (with --kvstashd)")
    ap.add_argument("-v", "--verbose", action="store_true", help="each row as it is done")
    a = ap.parse_args(argv)
    if not 0 < a.window <= 512 or a.prefix_blocks < 1:
        ap.error("--window in 1..512, --prefix-blocks >= 1")
    return a


def run(args, pb=None):
    """The whole benchmark; returns the summary (what --json writes). pb: generated
    messages of proto/ to use instead of generating them (a process that has them)."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bench = Bench(args)
    daemon = None if args.target else Daemon(args.kvstashd or find_kvstashd(),
                                             args.calib_tokens, args.daemon_args.split(),
                                             disk=bool(args.policies))
    target = args.target or daemon.target
    wire = None
    try:
        try:
            wire = Wire(target, pb)
        except Exception as e:  # no protoc or grpcio: SQuat without queries, reported
            print(f"ppl_bench: no gRPC wire ({e}); squat rows run without queries",
                  file=sys.stderr)
        with torch.inference_mode(), kvstash.Client(target) as client:
            offered = daemon_codecs(client, bench.cfg)
            which = args.codecs or ("" if args.policies else "all")
            codecs = offered if which == "all" else [c for c in which.split(",") if c]
            if args.policies and wire is None:
                raise SystemExit("--policies needs the gRPC wire (protoc, grpcio): KvAdmin.Evict")
            for v in parse_policies(args.policies or ""):
                codecs_of = [v.codec] + [c for c in (v.host, v.disk) if c]
                bad = [c for c in codecs_of if c not in offered]
                if bad:
                    raise SystemExit(f"policy {v.label}: codecs {bad} not offered: {offered}")
            unknown = [c for c in codecs if c not in offered]
            if unknown:
                raise SystemExit(f"codecs {unknown} not offered by the daemon: {offered}")
            res = bench.run(client, wire, codecs)
    finally:
        if wire:
            wire.close()
        if daemon:
            daemon.stop()
    return dict(weights=os.path.relpath(args.weights, REPO), model=bench.info,
                heldout=os.path.relpath(args.heldout, REPO), windows=len(bench.win),
                window=args.window, prefix=bench.P, calib_tokens=args.calib_tokens,
                codecs_offered=offered, seconds=time.time() - t0, **res)


def main(argv=None):
    args = parse_args(argv)
    s = run(args)
    report(s)
    print(f"\n{s['seconds']:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    if args.check:
        errors = check(s, args.max_rel)
        for e in errors:
            print("CHECK FAILED:", e, file=sys.stderr)
        return 1 if errors else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

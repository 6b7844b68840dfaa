"""Fidelity you can see and bound (issue 16, items 3-4; README "Namespace options").

Measured error per namespace: with error_sample 1 every Put's block is decoded again on the
daemon and its relative error of K and V counted in Stats (NamespaceInfo.fidelity) and
/metrics; the mean equals what this test computes from the raw Get, none measures 0, and
the codecs order as measured here. Error bound with fallback: max_rel_error makes every Put
checked, a side over the bound is stored with fallback_codec (PutReply, GetHeader and
Lookup say so, the block's header names the codec, Get returns it decoded with it, the
client library decodes the encoded block), through a restart with a disk tier; a generous
bound stores nothing that way; outliers fall back where smooth blocks do not.
"""
import ctypes
import re
import shutil
import subprocess

import grpc
import numpy as np
import pytest

import kvs

pb = kvs.pb
INVALID = grpc.StatusCode.INVALID_ARGUMENT
L, H, D, T = 4, 2, 128, 16
CODEC_IDS = {"none": 0, "fp8": 1, "kivi": 2, "polarquant": 3}


def gaussian(t, seed):
    return np.random.default_rng(seed).standard_normal((L, 2, t, H, D)).astype("<f2")


def outliers(t, seed, mag=15.0):
    """Gaussian with one channel at `mag` in every token of K and V: a per-token 2-bit
    group (KIVI's values) loses the other channels' levels to it (measured: value error
    0.66 against 0.38 for Gaussian data), while KIVI's per-channel keys hold it."""
    x = gaussian(t, seed)
    x[:, :, :, :, 5] = mag
    return x


def rel_err(x, y):
    """(K, V) relative L2 errors of a decoded block against its input, over the block."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    out = []
    for kv in (0, 1):
        a, b = x[:, kv], y[:, kv]
        out.append(np.linalg.norm(b - a) / np.linalg.norm(a))
    return out


def info_of(d, name):
    for n in d.stats().namespaces:
        if n.spec.name == name:
            return n
    raise AssertionError(f"namespace {name} not in Stats")


def get_array(d, name, key, t=T):
    return np.frombuffer(kvs.get(d.stub, name, key).data, "<f2").reshape(L, 2, t, H, D)


def lookup(d, name, keys):
    return d.stub.Lookup(pb.KeysRequest(namespace=name, keys=keys))


def sample(share):
    return pb.ErrorSample(share=share)


# ----------------------------------------------------------------------------- measured error


def test_sampling_all_puts_measures_each_codec(daemon):
    """error_sample 1: count == puts, the mean is the relative error of what a Get returns,
    none measures exactly 0, and the codecs order fp8 < kivi-4 < polarquant < kivi-2 on
    Gaussian KV (measured, not assumed: this is what the daemon reported)."""
    d = daemon()
    puts = 6
    means = {}
    for codec in ("none", "fp8", "kivi-4", "polarquant", "kivi-2"):
        name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec=codec, value_codec=codec,
                           error_sample=sample(1.0)).spec.name
        errs = []
        for i in range(puts):
            x = gaussian(T, kvs.seed_of(codec, i))
            r = kvs.put(d.stub, name, b"k%d" % i, T, x.tobytes())
            assert not r.fallback
            errs.append(rel_err(x, get_array(d, name, b"k%d" % i)))
        f = info_of(d, name).fidelity
        assert f.error_sample == 1.0
        assert f.key_error.count == f.value_error.count == puts
        assert f.checked == 0 and f.fallback_blocks == 0
        assert not f.HasField("logit_error")  # no query samples
        want = np.mean(errs, axis=0)
        assert f.key_error.sum / puts == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert f.value_error.sum / puts == pytest.approx(want[1], rel=1e-9, abs=1e-12)
        assert f.key_error.max == pytest.approx(max(e[0] for e in errs), rel=1e-9, abs=1e-12)
        assert list(f.key_error.buckets)[-1] == puts and len(f.key_error.bounds) == 10
        means[codec] = (want[0] + want[1]) / 2
    print("mean relative error (K+V)/2 on Gaussian KV:",
          {c: round(m, 4) for c, m in means.items()})
    assert means["none"] == 0
    assert 0 < means["fp8"] < means["kivi-4"] < means["polarquant"] < means["kivi-2"] < 0.7


def test_sample_share_zero_and_the_daemon_default(daemon):
    """error_sample 0 measures nothing; unset follows --error-sample (here 1), and a
    namespace's explicit share wins over it; NamespaceSpec keeps unset unset."""
    d = daemon(extra=["--error-sample", "1"])
    off = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4",
                      error_sample=sample(0.0)).spec.name
    dflt = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4")
    assert not dflt.spec.HasField("error_sample")
    assert dflt.fidelity.error_sample == 1.0
    for i in range(3):
        x = gaussian(T, i).tobytes()
        kvs.put(d.stub, off, b"%d" % i, T, x)
        kvs.put(d.stub, dflt.spec.name, b"%d" % i, T, x)
    fo, fd = info_of(d, off), info_of(d, dflt.spec.name)
    assert fo.spec.HasField("error_sample") and fo.spec.error_sample.share == 0
    assert fo.fidelity.error_sample == 0 and fo.fidelity.key_error.count == 0
    assert fd.fidelity.key_error.count == 3 and fd.fidelity.key_error.sum > 0
    assert fd.fidelity.value_error.sum == 0  # values: none


def test_squat_logit_error_from_query_samples(daemon):
    """A squat namespace with query samples also measures the attention-logit error, in
    Stats and /metrics; a namespace without them has none."""
    d = daemon()
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="squat-2", value_codec="kivi-2",
                       error_sample=sample(1.0)).spec.name
    kvs.put(d.stub, name, b"before", T, gaussian(T, 1).tobytes())
    assert not info_of(d, name).fidelity.HasField("logit_error")  # no queries yet
    q = np.random.default_rng(4).standard_normal((L, 32, 2 * H, D)).astype("<f2")
    d.admin.AddQueries(pb.AddQueriesRequest(namespace=name, query_heads=2 * H, tokens=32,
                                            queries=q.tobytes()))
    for i in range(3):
        kvs.put(d.stub, name, b"after%d" % i, T, gaussian(T, 10 + i).tobytes())
    f = info_of(d, name).fidelity
    assert f.key_error.count == 4
    assert f.logit_error.count == 3
    assert 0 < f.logit_error.sum / 3 < 1


# ----------------------------------------------------------------------------- the bound


def decode_with_library(spec, enc):
    """libkvstash's kvs_decode_block (the client library's CPU decode) of an encoded block,
    given the namespace's spec as the package's ctypes struct."""
    pkg = kvs.client_package()
    lib = pkg._lib.lib
    f = lib.kvs_decode_block
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.POINTER(pkg._lib.NsSpec), ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(pkg._lib.GetResult),
                  ctypes.POINTER(pkg._lib.Err)]
    s = pkg._lib.NsSpec(spec.name.encode(), spec.layers, spec.kv_heads, spec.head_dim,
                        spec.block_tokens, spec.dtype, spec.key_codec.encode(),
                        spec.value_codec.encode(), spec.keys_pre_rope, spec.durable, spec.seed,
                        spec.host_quota_bytes, spec.HasField("error_sample"),
                        spec.error_sample.share, spec.max_rel_error,
                        spec.fallback_codec.encode())
    cap = kvs.block_bytes(spec.layers, spec.kv_heads, spec.head_dim, spec.block_tokens)
    out = ctypes.create_string_buffer(cap)
    buf = ctypes.create_string_buffer(enc, len(enc))
    res, err = pkg._lib.GetResult(), pkg._lib.Err()
    rc = f(ctypes.byref(s), buf, len(enc), out, cap, ctypes.byref(res), ctypes.byref(err))
    assert rc == 0, err.msg.decode()
    return out.raw[:res.bytes], bool(res.fallback)


def test_bound_forces_fallback_none(daemon, tmp_path):
    """kivi-2 under max_rel_error 1e-4 (fallback none by default): every block is stored as
    it came, byte for byte, counted, and said so by PutReply, GetHeader, Lookup, GetMany, the
    encoded block's header and kvctl; the client library decodes the encoded block."""
    d = daemon()
    info = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                       max_rel_error=1e-4)
    name = info.spec.name
    assert info.spec.fallback_codec == "none" and info.fidelity.error_sample == 1.0
    data = {}
    for i, t in enumerate((T, 7, T)):
        data[i] = gaussian(t, 30 + i).tobytes()
        r = kvs.put(d.stub, name, b"b%d" % i, t, data[i])
        assert r.fallback and r.encoded_bytes == len(data[i]) + kvs.encoded_prefix_bytes(L)
    f = info_of(d, name).fidelity
    assert f.checked == 3 and f.fallback_blocks == 3
    assert f.fallback_keys == 3 and f.fallback_values == 3
    assert f.key_error.count == 3 and f.key_error.max == 0  # as stored: none
    for i in range(3):
        g = kvs.get(d.stub, name, b"b%d" % i)
        assert g.data == data[i]
        assert g.header.fallback
        assert (g.header.key_codec, g.header.value_codec) == ("none", "none")
        enc = kvs.get(d.stub, name, b"b%d" % i, fmt=kvs.ENCODED)
        assert enc.header.fallback
        hdr, _ = kvs.parse_encoded(enc.data)
        assert (hdr["k_codec"], hdr["v_codec"]) == (CODEC_IDS["none"], CODEC_IDS["none"])
        raw, fb = decode_with_library(info.spec, enc.data)
        assert raw == data[i] and fb
    lk = lookup(d, name, [b"b0", b"nope", b"b2"])
    assert list(lk.fallback) == [True, False, True] and lk.prefix_blocks == 1
    many = list(d.stub.GetMany(pb.GetManyRequest(namespace=name, keys=[b"b0", b"b1"])))
    headers = [m.header for m in many if m.HasField("header")]
    assert len(headers) == 2 and all(h.fallback and h.key_codec == "none" for h in headers)
    out = tmp_path / "local.bin"
    r = d.kvctl("get", name, "b1", out, "--local")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data[1] and b"fallback codec" in r.stderr
    r = d.kvctl("lookup", name, "b0", "zz")
    # host, or gpu where the daemon has a GPU tier: a Get promotes a fallback block too,
    # which keeps its codecs there (storage/tiering.c)
    assert r.returncode == 0 and re.search(rb"b0 +(host|gpu) \(fallback\)", r.stdout), r.stdout
    r = d.kvctl("--json", "stats")
    assert r.returncode == 0
    import json
    ns = [n for n in json.loads(r.stdout)["namespaces"] if n["name"] == name][0]
    assert ns["fidelity"]["fallback_blocks"] == 3 and ns["max_rel_error"] == 1e-4


def test_generous_bound_never_falls_back(daemon):
    """A bound every kivi-2 block meets: each Put is checked, none falls back, the blocks
    stay kivi-2 (their size and header say so)."""
    d = daemon()
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                       max_rel_error=0.9, fallback_codec="fp8").spec.name
    for i in range(4):
        x = gaussian(T, 40 + i).tobytes()
        r = kvs.put(d.stub, name, b"g%d" % i, T, x)
        assert not r.fallback and r.encoded_bytes < len(x) // 4
    f = info_of(d, name).fidelity
    assert f.checked == 4 and f.fallback_blocks == 0
    assert 0.2 < f.key_error.sum / 4 < 0.6
    assert list(lookup(d, name, [b"g0", b"g1"]).fallback) == [False, False]
    g = kvs.get(d.stub, name, b"g0")
    assert not g.header.fallback and g.header.key_codec == "kivi-2"
    hdr, _ = kvs.parse_encoded(kvs.get(d.stub, name, b"g0", fmt=kvs.ENCODED).data)
    assert hdr["k_codec"] == hdr["v_codec"] == CODEC_IDS["kivi"]


def test_outliers_fall_back_smooth_blocks_do_not(daemon):
    """kivi-2 under 0.5 with fp8 as the fallback: smooth blocks stay kivi-2; blocks with an
    outlier channel store their values (only) with fp8, and come back within fp8's error."""
    d = daemon()
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                       max_rel_error=0.5, fallback_codec="fp8").spec.name
    for i in range(5):
        assert not kvs.put(d.stub, name, b"s%d" % i, T, gaussian(T, 50 + i).tobytes()).fallback
    adv = {}
    for i in range(3):
        adv[i] = outliers(T, 60 + i)
        assert kvs.put(d.stub, name, b"a%d" % i, T, adv[i].tobytes()).fallback
    f = info_of(d, name).fidelity
    assert f.checked == 8 and f.fallback_blocks == 3
    assert f.fallback_keys == 0 and f.fallback_values == 3
    assert f.value_error.max < 0.5  # as stored: the fallback's error
    g = kvs.get(d.stub, name, b"a0")
    assert (g.header.key_codec, g.header.value_codec) == ("kivi-2", "fp8")
    ek, ev = rel_err(adv[0], get_array(d, name, b"a0"))
    assert ev < 0.05 and ek < 0.5
    assert list(lookup(d, name, [b"s0", b"a0"]).fallback) == [False, True]


def test_fallback_blocks_survive_a_restart(daemon, tmp_path):
    """A durable namespace (every block on disk before its Put is answered) with a bound:
    after SIGTERM and a start on the same --data-dir the spec keeps its options, Lookup
    still says fallback (read from the records' headers), and raw and encoded Gets decode
    (fallback none, and a mixed kivi-2/fp8 block)."""
    data_dir = str(tmp_path / "data")
    extra = ["--data-dir", data_dir, "--stats-interval", "0"]
    d = daemon(extra=extra)
    a = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                    max_rel_error=1e-4, durable=True, error_sample=sample(0.5)).spec.name
    b = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                    max_rel_error=0.5, fallback_codec="fp8", durable=True).spec.name
    xa, xs, xo = gaussian(T, 70), gaussian(T, 71), outliers(T, 72)
    assert kvs.put(d.stub, a, b"x", T, xa.tobytes()).fallback
    assert not kvs.put(d.stub, b, b"smooth", T, xs.tobytes()).fallback
    assert kvs.put(d.stub, b, b"odd", T, xo.tobytes()).fallback
    before_odd = kvs.get(d.stub, b, b"odd").data
    before_smooth = kvs.get(d.stub, b, b"smooth").data
    d.stop()
    d2 = daemon(extra=extra)
    sa = info_of(d2, a).spec
    assert sa.max_rel_error == 1e-4 and sa.fallback_codec == "none"
    assert sa.HasField("error_sample") and sa.error_sample.share == 0.5
    assert info_of(d2, b).spec.fallback_codec == "fp8"
    assert list(lookup(d2, a, [b"x"]).fallback) == [True]
    assert list(lookup(d2, b, [b"smooth", b"odd"]).fallback) == [False, True]
    assert lookup(d2, a, [b"x"]).tiers[0] == pb.TIER_DISK
    g = kvs.get(d2.stub, a, b"x")
    assert g.data == xa.tobytes() and g.header.fallback
    g = kvs.get(d2.stub, b, b"odd")
    assert g.data == before_odd and g.header.value_codec == "fp8"
    assert kvs.get(d2.stub, b, b"smooth").data == before_smooth
    enc = kvs.get(d2.stub, b, b"odd", fmt=kvs.ENCODED).data
    hdr, _ = kvs.parse_encoded(enc)
    assert (hdr["k_codec"], hdr["v_codec"]) == (CODEC_IDS["kivi"], CODEC_IDS["fp8"])
    raw, fb = decode_with_library(info_of(d2, b).spec, enc)
    assert raw == before_odd and fb
    # Stats start afresh with the daemon (counters since start); new Puts count again.
    assert info_of(d2, a).fidelity.checked == 0
    assert kvs.put(d2.stub, a, b"y", T, xa.tobytes()).fallback
    assert info_of(d2, a).fidelity.fallback_blocks == 1


# ----------------------------------------------------------------------------- the options


def test_options_are_checked_naming_the_field(daemon):
    d = daemon()
    bad = [
        (dict(error_sample=sample(1.5)), "error_sample"),
        (dict(max_rel_error=-1.0), "max_rel_error"),
        (dict(max_rel_error=float("inf")), "max_rel_error"),
        (dict(fallback_codec="fp8"), "fallback_codec"),  # no bound
        (dict(max_rel_error=0.1, fallback_codec="rotatekv-2"), "fallback_codec"),
        (dict(max_rel_error=0.1, fallback_codec="zstd"), "fallback_codec"),
        (dict(max_rel_error=0.1, fallback_codec="kivi-2"), "fallback_codec"),  # its own
    ]
    for kw, field in bad:
        kvs.expect_error(INVALID, kvs.make_ns, d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2",
                         value_codec="kivi-2", words=(field,), **kw)
    r = d.kvctl("ns", "create", "k", "--layers", L, "--kv-heads", H, "--head-dim", D,
                "--block-tokens", T, "--error-sample", "2")
    assert r.returncode == 2 and b"--error-sample" in r.stderr
    r = d.kvctl("ns", "create", "k", "--layers", L, "--kv-heads", H, "--head-dim", D,
                "--block-tokens", T, "--codec", "kivi-2", "--max-rel-error", "0.3",
                "--fallback-codec", "fp8", "--error-sample", "0.25")
    assert r.returncode == 0, r.stderr
    s = info_of(d, "k").spec
    assert (s.max_rel_error, s.fallback_codec, s.error_sample.share) == (0.3, "fp8", 0.25)
    r = subprocess.run([kvs.KVSTASHD, "--error-sample", "x"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "--error-sample" in r.stderr


def test_python_package_options_and_figures(daemon):
    """The Python package's create_namespace takes the options; Namespace carries them and
    the measured figures; a Put says whether it fell back."""
    pkg = kvs.client_package()
    d = daemon()
    with pkg.Client(d.target) as c:
        ns = c.create_namespace(kvs.ns_name("py"), L, H, D, T, key_codec="kivi-2",
                                value_codec="kivi-2", max_rel_error=0.5, fallback_codec="fp8")
        assert (ns.max_rel_error, ns.fallback_codec, ns.error_sample) == (0.5, "fp8", None)
        assert c.put(ns.name, b"o", outliers(T, 80)).fallback
        assert not c.put(ns.name, b"s", gaussian(T, 81)).fallback
        got = c.namespace(ns.name).fidelity
        assert got["checked"] == 2 and got["fallback_blocks"] == 1
        assert got["fallback_values"] == 1 and got["keys"]["count"] == 2
        s = c.create_namespace(kvs.ns_name("py"), L, H, D, T, key_codec="polarquant",
                               error_sample=1.0)
        assert s.error_sample == 1.0 and s.fidelity["error_sample"] == 1.0
        c.put(s.name, b"p", gaussian(T, 82))
        assert 0.1 < c.namespace(s.name).fidelity["keys"]["mean"] < 0.3


def test_metrics_per_namespace(daemon):
    """/metrics: the error histogram of a measuring namespace (count == puts, keys and
    values), the fallback counter of a bounded one, the measurements by where they ran;
    promtool accepts the page."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemon(extra=["--metrics-listen", f"127.0.0.1:{port}", "--error-sample", "0"])
    m = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4",
                    error_sample=sample(1.0)).spec.name
    q = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4").spec.name
    bnd = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2",
                      max_rel_error=1e-4).spec.name
    for i in range(3):
        kvs.put(d.stub, m, b"%d" % i, T, gaussian(T, i).tobytes())
        kvs.put(d.stub, q, b"%d" % i, T, gaussian(T, i).tobytes())
    kvs.put(d.stub, bnd, b"b", T, gaussian(T, 9).tobytes())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    fam = "kvstash_namespace_rel_error_ratio"
    assert f'{fam}_count{{namespace="{m}",kv="keys"}} 3' in text
    assert f'{fam}_bucket{{namespace="{m}",kv="values",le="+Inf"}} 3' in text
    assert f'namespace="{q}"' not in text.split(f"# HELP {fam}")[1].split("# HELP")[0]
    assert f'kvstash_namespace_fallback_blocks_total{{namespace="{bnd}"}} 1' in text
    # Measurements by where they ran: the 3 sampled Puts and the bounded one once each where
    # they were encoded, and the bounded one again on the CPU after its fallback re-encode.
    # With a GPU engine (tests/gpu/device-check.sh) the engine measures what it encodes.
    def ops(op, engine):
        line = f'kvstash_codec_ops_total{{op="{op}",engine="{engine}"}} '
        return sum(int(l[len(line):]) for l in text.splitlines() if l.startswith(line))
    on_gpu = ops("encode", "gpu")
    assert ops("measure", "cpu") + ops("measure", "gpu") == 5, text
    assert (ops("measure", "gpu"), ops("measure", "cpu")) == ((4, 1) if on_gpu else (0, 5))
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

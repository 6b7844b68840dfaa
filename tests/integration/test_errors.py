"""Every error status of the wire API, provoked by a bad request: the status code and a
details text that names the field at fault (DESIGN §4). A bad request never crashes the
daemon or loses other data: a sentinel block is checked byte-exact at the end, and the
daemon must still exit 0 on SIGTERM."""
import threading
import time

import grpc
import pytest

import kvs
from kvs import BF16, FP16, pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

L, H, D, T = 2, 2, 16, 4


@pytest.fixture(scope="module")
def d(module_daemon):
    return module_daemon(host_capacity="64M")


@pytest.fixture(scope="module")
def ns(d):
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    kvs.put(d.stub, ns.name, b"sentinel", T, ns.payload(T, seed=42))
    yield ns
    # After every bad request of the module, the daemon still serves the old data.
    assert kvs.get(d.stub, ns.name, b"sentinel").data == ns.payload(T, seed=42)
    assert d.health().status == kvs.SERVING


def put_msgs(d, msgs, **kw):
    return d.stub.Put(iter(msgs), timeout=10, **kw)


def hdr(ns, key=b"k", tokens=T, dtype=FP16, payload_bytes=0, name=None):
    return pb.PutChunk(header=pb.PutHeader(namespace=ns.name if name is None else name,
                                           key=key, tokens=tokens, dtype=dtype,
                                           payload_bytes=payload_bytes))


def data(b):
    return pb.PutChunk(data=b)


# ------------------------------------------------------------------ Put payload and header

def test_payload_bytes_mismatch(d, ns):
    n = ns.bytes()
    for wrong in (n + 2, n - 2, 1):
        kvs.expect_error(INVALID, put_msgs, d,
                         [hdr(ns, payload_bytes=wrong), data(ns.payload())],
                         words="payload_bytes")


def test_too_many_bytes(d, ns):
    p = ns.payload()
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns), data(p + b"\0\0")], words="payload")
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns), data(p), data(b"\1")], words="payload")


def test_truncated_stream(d, ns):
    """The client half-closes after part of the payload."""
    p = ns.payload()
    e = kvs.expect_error(INVALID, put_msgs, d, [hdr(ns, key=b"trunc"), data(p[:len(p) // 2])])
    assert "payload" in e.details().lower() or "truncated" in e.details().lower(), e.details()
    e = kvs.expect_error(INVALID, put_msgs, d, [hdr(ns, key=b"trunc")])
    assert "payload" in e.details().lower() or "truncated" in e.details().lower(), e.details()
    # Nothing was stored under that key.
    r = d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=[b"trunc"]))
    assert list(r.present) == [False]


def poke(payload_bytes, t, index, value):
    """payload with the 16-bit element at (layer, kv, token, head, channel) = value."""
    layer, kv, tok, head, ch = index
    i = (((layer * 2 + kv) * t + tok) * H + head) * D + ch
    b = bytearray(payload_bytes)
    b[2 * i:2 * i + 2] = value.to_bytes(2, "little")
    return bytes(b)


NONFINITE = {
    # dtype: [(name, bits)]
    FP16: [("NaN", 0x7E00), ("NaN", 0xFC01), ("+Inf", 0x7C00), ("-Inf", 0xFC00)],
    BF16: [("NaN", 0x7FC0), ("NaN", 0xFF81), ("+Inf", 0x7F80), ("-Inf", 0xFF80)],
}


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_nonfinite_payload(d, dtype):
    """NaN or Inf anywhere in the payload: INVALID_ARGUMENT naming the payload and the
    element (DESIGN §4); an older block under the key is kept."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, dtype=dtype))
    good = ns.payload(3, seed=1)
    kvs.put(d.stub, ns.name, b"k", 3, good, dtype=dtype)
    used = d.host_tier().used_bytes
    spots = [(0, 0, 0, 0, 0), (1, 1, 2, 1, 15), (1, 0, 1, 0, 7)]
    for (name, bits), spot in zip(NONFINITE[dtype], spots + spots[:1]):
        bad = poke(ns.payload(3, seed=2), 3, spot, bits)
        e = kvs.expect_error(INVALID, kvs.put, d.stub, ns.name, b"k", 3, bad, dtype=dtype,
                             words=["payload", name])
        layer, kv, tok, head, ch = spot
        want = f"layer {layer}, {'KV'[kv]}, token {tok}, head {head}, channel {ch}"
        assert want in e.details(), (e.details(), want)
    assert kvs.get(d.stub, ns.name, b"k").data == good
    assert d.host_tier().used_bytes == used


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_extreme_finite_values_accepted(d, dtype):
    """The largest finite values, subnormals and -0 are data, not errors."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, dtype=dtype))
    top = 0x7BFF if dtype == FP16 else 0x7F7F
    p = ns.payload(2, seed=3)
    for i, v in enumerate([top, top | 0x8000, 0x0001, 0x8001, 0x8000, 0x0000]):
        p = poke(p, 2, (i % L, i % 2, i % 2, i % H, i), v)
    kvs.put(d.stub, ns.name, b"x", 2, p, dtype=dtype)
    assert kvs.get(d.stub, ns.name, b"x").data == p


def test_missing_header(d, ns):
    kvs.expect_error(INVALID, put_msgs, d, [data(ns.payload())], words="header")
    kvs.expect_error(INVALID, put_msgs, d, [], words="header")
    # A chunk with neither header nor data first.
    kvs.expect_error(INVALID, put_msgs, d, [pb.PutChunk(), data(ns.payload())], words="header")


def test_second_header(d, ns):
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns), hdr(ns), data(ns.payload())],
                     words="header")
    p = ns.payload()
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns), data(p[:10]), hdr(ns), data(p[10:])],
                     words="header")


@pytest.mark.parametrize("tokens", [0, T + 1, 1 << 31, 0xFFFFFFFF])
def test_bad_tokens(d, ns, tokens):
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns, tokens=tokens), data(b"\0" * 64)],
                     words="tokens")


@pytest.mark.parametrize("dtype", [BF16, pb.DTYPE_UNSPECIFIED, 7])
def test_dtype_mismatch(d, ns, dtype):
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns, dtype=dtype), data(ns.payload())],
                     words="dtype")


def test_unknown_namespace(d, ns):
    kvs.expect_error(NOT_FOUND, put_msgs, d, [hdr(ns, name="no-such-ns"), data(ns.payload())],
                     words="namespace")
    kvs.expect_error(NOT_FOUND, kvs.get, d.stub, "no-such-ns", b"k", words="namespace")
    for rpc in (d.stub.Lookup, d.stub.Exists, d.stub.Delete):
        kvs.expect_error(NOT_FOUND, rpc, pb.KeysRequest(namespace="no-such-ns", keys=[b"k"]),
                         words="namespace")
    kvs.expect_error(NOT_FOUND, d.admin.DropNamespace, pb.NameRequest(name="no-such-ns"),
                     words="namespace")


@pytest.mark.parametrize("key", [b"", b"x" * 65, b"y" * 1000], ids=["empty", "65", "1000"])
def test_bad_key(d, ns, key):
    kvs.expect_error(INVALID, put_msgs, d, [hdr(ns, key=key), data(ns.payload())], words="key")
    kvs.expect_error(INVALID, kvs.get, d.stub, ns.name, key, words="key")


def test_get_missing_key(d, ns):
    kvs.expect_error(NOT_FOUND, kvs.get, d.stub, ns.name, b"never-stored", words="key")


@pytest.mark.parametrize("begin,end", [(1, 1), (2, 1), (0, L + 1), (L, 0), (L, L + 1),
                                       (5, 0), (0xFFFFFFFF, 0)])
def test_bad_layer_range(d, ns, begin, end):
    kvs.expect_error(INVALID, kvs.get, d.stub, ns.name, b"sentinel", layer_begin=begin,
                     layer_end=end, words="layer")


def test_get_encoded_with_layer_range(d, ns):
    """An encoded block is served whole: a layer range needs format RAW."""
    kvs.expect_error(INVALID, kvs.get, d.stub, ns.name, b"sentinel", fmt=kvs.ENCODED,
                     layer_begin=0, layer_end=1, words="layer")


def test_get_unknown_format(d, ns):
    """proto rule: an unknown enum value is treated as UNSPECIFIED and answered with
    INVALID_ARGUMENT where a value is needed."""
    kvs.expect_error(INVALID, kvs.get, d.stub, ns.name, b"sentinel", fmt=7, words="format")


def test_unknown_fields_ignored(d, ns):
    """Fields a v1.0 server does not know (100-199 are reserved for extensions) are
    skipped, not refused: a newer client still talks to this server."""
    ext = b"\xa0\x06\x01" + b"\xaa\x06\x03abc"  # field 100 = 1, field 101 = "abc"
    h = pb.PutHeader(namespace=ns.name, key=b"ext", tokens=T, dtype=FP16)
    h.MergeFromString(ext)
    assert h.SerializeToString().endswith(ext)
    p = ns.payload(T, seed=77)
    r = d.stub.Put(iter([pb.PutChunk(header=h), data(p)]), timeout=10)
    assert r.raw_bytes == len(p)
    req = pb.GetRequest(namespace=ns.name, key=b"ext")
    req.MergeFromString(ext)
    msgs = list(d.stub.Get(req, timeout=10))
    assert b"".join(m.data for m in msgs[1:]) == p
    kr = pb.KeysRequest(namespace=ns.name, keys=[b"ext"])
    kr.MergeFromString(b"\xa0\x06\x01")
    assert d.stub.Lookup(kr, timeout=10).prefix_blocks == 1


def test_lookup_empty_key_in_list(d, ns):
    keys = [b"a", b"sentinel", b"", b"b"]
    for rpc in (d.stub.Lookup, d.stub.Exists, d.stub.Delete):
        kvs.expect_error(INVALID, rpc, pb.KeysRequest(namespace=ns.name, keys=keys),
                         words="keys[2]")
    kvs.expect_error(INVALID, d.stub.Lookup,
                     pb.KeysRequest(namespace=ns.name, keys=[b"a", b"z" * 65]), words="keys[1]")
    # The Delete above must not have deleted the valid keys before failing.
    assert list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=[b"sentinel"])).present) \
        == [True]


def test_too_many_keys(d, ns):
    """--max-keys defaults to 4096."""
    keys = [i.to_bytes(4, "little") for i in range(4097)]
    e = kvs.rpc_error(d.stub.Lookup, pb.KeysRequest(namespace=ns.name, keys=keys))
    assert e.code() in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED), e.code()
    assert "keys" in e.details().lower(), e.details()
    # 4096 keys is fine.
    r = d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=keys[:4096]))
    assert len(r.tiers) == 4096


# ------------------------------------------------------------------ namespaces

@pytest.mark.parametrize("field,kw", [
    ("head_dim", dict(D=24)),
    ("head_dim", dict(D=0)),
    ("layers", dict(L=0)),
    ("kv_heads", dict(H=0)),
    ("block_tokens", dict(T=0)),
    ("dtype", dict(dtype=pb.DTYPE_UNSPECIFIED)),
    ("key_codec", dict(key_codec="bogus")),
    ("value_codec", dict(value_codec="zstd-9")),
    ("name", dict(name="bad name!")),
    ("name", dict(name="a/b")),
    ("name", dict(name="n" * 65)),
    ("layers", dict(L=1 << 20)),
    ("head_dim", dict(D=1 << 20)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_namespace_spec(d, field, kw):
    kw.setdefault("name", kvs.ns_name("bad"))
    s = kvs.spec(**kw)
    kvs.expect_error(INVALID, d.admin.CreateNamespace, pb.CreateNamespaceRequest(spec=s),
                     words=field)
    # Nothing half-created.
    names = [n.spec.name for n in d.admin.ListNamespaces(pb.ListNamespacesRequest()).namespaces]
    assert s.name not in names


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "n" * 64, "0", "...", "-x-"])
def test_good_namespace_names(d, name):
    """1..64 of [A-Za-z0-9._-]."""
    info = kvs.make_ns(d.admin, name=name)
    assert info.spec.name == name
    d.admin.DropNamespace(pb.NameRequest(name=name), timeout=10)


def test_empty_namespace_name(d):
    s = kvs.spec()
    s.name = ""
    kvs.expect_error(INVALID, d.admin.CreateNamespace, pb.CreateNamespaceRequest(spec=s),
                     words="name")


def test_duplicate_namespace(d):
    s = kvs.spec()
    d.admin.CreateNamespace(pb.CreateNamespaceRequest(spec=s))
    kvs.expect_error(grpc.StatusCode.ALREADY_EXISTS, d.admin.CreateNamespace,
                     pb.CreateNamespaceRequest(spec=s))
    # Same name, different layout: still taken.
    s2 = kvs.spec(name=s.name, L=8)
    kvs.expect_error(grpc.StatusCode.ALREADY_EXISTS, d.admin.CreateNamespace,
                     pb.CreateNamespaceRequest(spec=s2))


def test_unknown_method(d):
    for method in ("/kvstash.v1.KvStash/Nope", "/kvstash.v1.KvAdmin/Nope",
                   "/no.such.Service/Get"):
        call = d.channel.unary_unary(method, request_serializer=lambda x: x,
                                     response_deserializer=lambda x: x)
        kvs.expect_error(grpc.StatusCode.UNIMPLEMENTED, call, b"", timeout=10)


def test_garbage_message(d, ns):
    """Bytes that are not a valid protobuf message: INVALID_ARGUMENT (or INTERNAL from the
    deserializer), never a crash."""
    call = d.channel.unary_unary("/kvstash.v1.KvStash/Lookup", request_serializer=lambda x: x,
                                 response_deserializer=lambda x: x)
    e = kvs.rpc_error(call, b"\xff\xff\xff\xff\x0f\x0a", timeout=10)
    assert e.code() in (INVALID, grpc.StatusCode.INTERNAL), e.code()
    assert d.health().status == kvs.SERVING


def test_abandoned_put_is_harmless(d, ns):
    """A client that cancels a Put halfway leaves nothing behind and no reservation."""
    used = d.host_tier().used_bytes
    ev = threading.Event()
    p = ns.payload()

    def gen():
        yield hdr(ns, key=b"cancelled")
        yield data(p[:10])
        ev.wait(10)

    f = d.stub.Put.future(gen(), timeout=10)
    time.sleep(0.3)
    f.cancel()
    ev.set()
    with pytest.raises(grpc.FutureCancelledError):
        f.result()
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == used
    assert list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=[b"cancelled"])).present) \
        == [False]


def test_namespace_dropped_during_put(d):
    """A Put whose namespace is dropped before it completes is refused (NOT_FOUND naming
    the namespace), and its reservation is returned."""
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    used = d.host_tier().used_bytes
    p = ns.payload()
    half = threading.Event()
    go = threading.Event()

    def gen():
        yield hdr(ns, key=b"orphan")
        yield data(p[:len(p) // 2])
        half.set()
        go.wait(10)
        yield data(p[len(p) // 2:])

    f = d.stub.Put.future(gen(), timeout=20)
    assert half.wait(10)
    time.sleep(0.2)
    assert d.admin.DropNamespace(pb.NameRequest(name=ns.name)).blocks_dropped == 0
    go.set()
    e = f.exception(timeout=20)
    assert e is not None, f"Put into a dropped namespace succeeded: {f.result()}"
    assert e.code() == NOT_FOUND, (e.code(), e.details())
    assert "namespace" in e.details(), e.details()
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == used


# ------------------------------------------------------------------ limits (own daemons)

def test_oversize_message(daemon):
    d = daemon(host_capacity="64M", extra=["--max-message", "1M"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))  # 2 MiB blocks
    p = ns.payload()
    # One data chunk of 1.5 MiB > 1 MiB.
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, d.stub, ns.name, b"big", 16,
                     p, chunk=3 << 19)
    # The refused Put's reservation is returned.
    deadline = time.monotonic() + 5
    while d.host_tier().used_bytes != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.host_tier().used_bytes == 0
    # The same block in chunks under the limit is fine, and a Get of it streams in
    # messages that fit the limit.
    kvs.put(d.stub, ns.name, b"big", 16, p, chunk=512 << 10)
    assert kvs.get(d.stub, ns.name, b"big").data == p
    ch, stub, _ = d.stubs([("grpc.max_receive_message_length", 1 << 20)])
    with ch:
        assert kvs.get(stub, ns.name, b"big").data == p


def test_block_over_host_capacity(daemon):
    d = daemon(host_capacity="1M")
    # 2 MiB full block > 1 MiB host tier.
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.make_ns, d.admin, L=32, H=8,
                     D=128, T=16)
    # One that fits, encoded header included, is accepted.
    kvs.make_ns(d.admin, L=15, H=8, D=128, T=16)


# ------------------------------------------------------------------ auth

CLIENT, ADMIN = "client-secret", "admin-secret"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def authd(module_daemon):
    return module_daemon(extra=["--token", CLIENT, "--admin-token", ADMIN], token=ADMIN)


def test_auth_health_needs_no_token(authd):
    assert authd.admin.Health(pb.HealthRequest(), timeout=5).status == kvs.SERVING


@pytest.mark.parametrize("md", [None, kvs.bearer("wrong"), (("authorization", CLIENT),),
                                (("authorization", "Bearer "),)],
                         ids=["none", "wrong", "no-bearer-prefix", "empty"])
def test_auth_unauthenticated(authd, md):
    d = authd
    kvs.expect_error(UNAUTH, d.stub.Lookup, pb.KeysRequest(namespace="x", keys=[b"k"]),
                     metadata=md)
    kvs.expect_error(UNAUTH, kvs.get, d.stub, "x", b"k", metadata=md)
    kvs.expect_error(UNAUTH, kvs.put, d.stub, "x", b"k", 1, b"\0" * 64, metadata=md)
    kvs.expect_error(UNAUTH, d.admin.ListNamespaces, pb.ListNamespacesRequest(), metadata=md)
    kvs.expect_error(UNAUTH, d.admin.CreateNamespace,
                     pb.CreateNamespaceRequest(spec=kvs.spec()), metadata=md)


def test_auth_client_token(authd):
    d = authd
    c, a = kvs.bearer(CLIENT), kvs.bearer(ADMIN)
    kvs.expect_error(DENIED, d.admin.CreateNamespace, pb.CreateNamespaceRequest(spec=kvs.spec()),
                     metadata=c)
    ns = kvs.Ns(kvs.make_ns(d.admin, metadata=a))
    kvs.expect_error(DENIED, d.admin.DropNamespace, pb.NameRequest(name=ns.name), metadata=c)
    # The client token works on the data path.
    p = ns.payload()
    kvs.put(d.stub, ns.name, b"k", T, p, metadata=c)
    assert kvs.get(d.stub, ns.name, b"k", metadata=c).data == p
    assert d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=[b"k"]), metadata=c) \
        .prefix_blocks == 1
    assert d.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=[b"k"]), metadata=c).deleted == 1


def test_auth_admin_token_works_everywhere(authd):
    d = authd
    a = kvs.bearer(ADMIN)
    ns = kvs.Ns(kvs.make_ns(d.admin, metadata=a))
    p = ns.payload()
    kvs.put(d.stub, ns.name, b"k", T, p, metadata=a)
    assert kvs.get(d.stub, ns.name, b"k", metadata=a).data == p
    assert list(d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=[b"k"]), metadata=a)
                .present) == [True]
    assert d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=[b"k"]), metadata=a) \
        .prefix_blocks == 1
    assert any(n.spec.name == ns.name for n in
               d.admin.ListNamespaces(pb.ListNamespacesRequest(), metadata=a).namespaces)
    assert d.admin.Stats(pb.StatsRequest(), metadata=a).version
    assert d.admin.Health(pb.HealthRequest(), metadata=a).status == kvs.SERVING
    assert d.admin.DropNamespace(pb.NameRequest(name=ns.name), metadata=a).blocks_dropped == 1

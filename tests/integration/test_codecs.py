"""Every codec through the daemon (issue 3): selectable per namespace (keys and values
separately), Put encodes, Get decodes within the codec's error class, Get(ENCODED) returns
a well-formed block whose size matches the codec's bits; codec state learned online
(RotateKV calibration from stored keys, SQuat queries through KvAdmin.AddQueries) gets a
new state version, and blocks of every version stay readable."""
import grpc
import numpy as np
import pytest

import kvs

L, H, D, T = 2, 4, 128, 32
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# Relative L2 error bounds on Gaussian data (the codecs' unit tests pin them down finely;
# here they only catch a daemon that decodes with the wrong codec or state).
BOUNDS = {"none": 0.0, "fp8": 0.05, "kivi-4": 0.12, "kivi-3": 0.25, "kivi-2": 0.5, "squat-2": 0.55,
          "squat-4": 0.12, "polarquant": 0.22, "rotatekv-2": 0.5, "rotatekv-3": 0.3,
          "rotatekv-4": 0.15}
# Section payload bits per element at t = T = 32 (no sinks on Gaussian data).
BITS = {"none": 16, "fp8": 8 + 32 / (T * D), "kivi-2": 3, "kivi-3": 4, "kivi-4": 5, "squat-2": 3,
        "squat-4": 5, "polarquant": 3.875, "rotatekv-2": 2.25, "rotatekv-3": 3.25,
        "rotatekv-4": 4.25}


def gaussian(t, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((L, 2, t, H, D)).astype("<f2")


def rel(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(a)


@pytest.mark.parametrize("codec", sorted(BOUNDS))
def test_codec_round_trip_through_daemon(daemon, codec):
    d = daemon()
    ns = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec=codec, value_codec=codec, seed=5)
    assert ns.spec.key_codec == codec
    x = gaussian(T, 1)
    reply = kvs.put(d.stub, ns.spec.name, b"k", T, x.tobytes())
    got = np.frombuffer(kvs.get(d.stub, ns.spec.name, b"k").data, "<f2").reshape(x.shape)
    assert np.isfinite(got.astype(np.float32)).all()
    e = rel(x, got)
    assert e <= BOUNDS[codec] + 1e-9, (codec, e)
    if codec != "none":
        assert e > 0  # a lossy codec really ran
    enc = kvs.get(d.stub, ns.spec.name, b"k", fmt=kvs.ENCODED).data
    assert len(enc) == reply.encoded_bytes
    hdr, sections = kvs.parse_encoded(enc)
    payload_bits = 8 * sum(b - a for a, b in sections) / x.size
    assert abs(payload_bits - BITS[codec]) < 1e-9, (codec, payload_bits)
    # Partial block, one token.
    y = gaussian(1, 2)
    kvs.put(d.stub, ns.spec.name, b"one", 1, y.tobytes())
    got1 = np.frombuffer(kvs.get(d.stub, ns.spec.name, b"one").data, "<f2").reshape(y.shape)
    assert rel(y, got1) <= max(BOUNDS[codec] * 1.6, 1e-9)


def test_mixed_key_and_value_codecs(daemon):
    d = daemon()
    ns = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4", value_codec="polarquant")
    x = gaussian(T, 3)
    kvs.put(d.stub, ns.spec.name, b"m", T, x.tobytes())
    got = np.frombuffer(kvs.get(d.stub, ns.spec.name, b"m").data, "<f2").reshape(x.shape)
    assert rel(x[:, 0], got[:, 0]) < 0.12 and 0.12 < rel(x[:, 1], got[:, 1]) < 0.22
    hdr, _ = kvs.parse_encoded(kvs.get(d.stub, ns.spec.name, b"m", fmt=kvs.ENCODED).data)
    assert (hdr["k_codec"], hdr["k_bits"], hdr["v_codec"]) == (2, 4, 3)


def test_unknown_codec_names_available_ones(daemon):
    d = daemon()
    e = kvs.rpc_error(kvs.make_ns, d.admin, L=L, H=H, D=D, T=T, key_codec="zip")
    assert e.code() == INVALID and "key_codec" in e.details() and "polarquant" in e.details()


def ns_info(d, name):
    return [n for n in d.admin.ListNamespaces(kvs.pb.ListNamespacesRequest()).namespaces
            if n.spec.name == name][0]


def test_rotatekv_calibrates_online_and_old_blocks_stay_readable(daemon, tmp_path):
    d = daemon(extra=["--calib-tokens", "64"])
    ns = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="rotatekv-2",
                     value_codec="rotatekv-2")
    name = ns.spec.name
    blocks = {}
    for i in range(4):  # 2 blocks (64 tokens) calibrate; the 2nd publishes version 1
        x = gaussian(T, 10 + i)
        x[:, 0, :, 1, 7] += 6.0 * (i + 1) / 4  # a drifting outlier channel to sort
        blocks[i] = x
        kvs.put(d.stub, name, b"r%d" % i, T, x.tobytes())
    assert ns_info(d, name).key_state_version == 1
    states = [kvs.parse_encoded(kvs.get(d.stub, name, b"r%d" % i, fmt=kvs.ENCODED).data)[0]
              ["k_state"] for i in range(4)]
    assert states[0] == 0 and states[3] == 1
    for i, x in blocks.items():  # every version decodes with its own permutation
        raw = kvs.get(d.stub, name, b"r%d" % i).data
        got = np.frombuffer(raw, "<f2").reshape(x.shape)
        assert rel(x, got) < 0.5
        # ...on the client too: libkvstash fetches the block's state (GetCodecState).
        out = tmp_path / f"r{i}.bin"
        r = d.kvctl("get", name, f"r{i}", out, "--local")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == raw
    st = d.stub.GetCodecState(kvs.pb.CodecStateRequest(namespace=name, version=1))
    assert st.version == 1 and len(st.state) > 0
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.stub.GetCodecState,
                     kvs.pb.CodecStateRequest(namespace=name, version=2), words=("version",))
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.stub.GetCodecState,
                     kvs.pb.CodecStateRequest(namespace=name, values=True, version=1),
                     words=("value codec state version 1",))


def test_squat_queries_publish_a_state_version(daemon, tmp_path):
    d = daemon()
    ns = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="squat-2", value_codec="squat-2")
    name = ns.spec.name
    x = gaussian(T, 20)
    kvs.put(d.stub, name, b"before", T, x.tobytes())
    rng = np.random.default_rng(4)
    basis = rng.standard_normal((8, D))  # queries live in an 8-dim subspace
    q = (rng.standard_normal((L, 48, 2 * H, 8)) @ basis).astype("<f2")
    info = d.admin.AddQueries(kvs.pb.AddQueriesRequest(namespace=name, query_heads=2 * H,
                                                       tokens=48, queries=q.tobytes()))
    assert info.key_state_version == 1 and info.value_state_version == 0
    kvs.put(d.stub, name, b"after", T, x.tobytes())
    enc = kvs.get(d.stub, name, b"after", fmt=kvs.ENCODED).data
    assert kvs.parse_encoded(enc)[0]["k_state"] == 1
    before = np.frombuffer(kvs.get(d.stub, name, b"before").data, "<f2").reshape(x.shape)
    after = np.frombuffer(kvs.get(d.stub, name, b"after").data, "<f2").reshape(x.shape)
    # Key error inside the query subspace shrinks with the state (SQuat's purpose).
    def in_subspace(k):
        return np.linalg.norm(k.astype(np.float64) @ basis.T)
    k = x[:, 0]
    assert in_subspace(k - after[:, 0]) < in_subspace(k - before[:, 0])
    # SQuat bytes decode without state: the client decodes them locally.
    out = tmp_path / "after.bin"
    r = d.kvctl("get", name, "after", out, "--local")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == after.tobytes()


def test_add_queries_errors(daemon):
    d = daemon()
    sq = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="squat-2").spec.name
    kv = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2").spec.name
    q = np.zeros((L, 4, 2 * H, D), "<f2").tobytes()
    req = kvs.pb.AddQueriesRequest
    kvs.expect_error(INVALID, d.admin.AddQueries, req(namespace=sq, query_heads=2 * H, tokens=5,
                                                      queries=q), words="queries")
    kvs.expect_error(INVALID, d.admin.AddQueries, req(namespace=sq, query_heads=0, tokens=4,
                                                      queries=q), words="query_heads")
    kvs.expect_error(INVALID, d.admin.AddQueries, req(namespace=kv, query_heads=2 * H, tokens=4,
                                                      queries=q), words="squat")
    kvs.expect_error(grpc.StatusCode.NOT_FOUND, d.admin.AddQueries,
                     req(namespace="nope", query_heads=2 * H, tokens=4, queries=q))


def test_kvctl_bench_with_a_lossy_codec(daemon):
    """kvctl bench verifies lossy namespaces by error, not bytes: finite, within its bound,
    and reports the mean relative error."""
    d = daemon()
    name = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="polarquant",
                       value_codec="polarquant").spec.name
    r = d.kvctl("bench", name, "--blocks", "6", "--threads", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "verified 6/6 blocks" in out and "mean 0.1" in out, out

"""The Python package (client/python/kvstash, issue 13 item 1) against a real daemon: every
call, both batched paths (shared memory with a daemon on this host, gRPC bytes otherwise,
`last_path` telling which ran), errors as exceptions with the gRPC status and the daemon's
message, and the chained block keys of the README. CUDA IPC (issue 12 item 3): the
registration's refusal by a daemon without a GPU engine here; the path itself on the GPU
machine (tests/gpu/device-check.sh)."""
import contextlib
import ctypes
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import kvs

kvstash = kvs.client_package()


@contextlib.contextmanager
def _unix_daemon(tmp_path_factory, label, *extra):
    """A daemon on a Unix socket (its region socket on), stderr in "stderr" beside it;
    extra flags after $KVSTASHD_EXTRA's (the last of a repeated flag wins). Yields its
    target, or None if it exited at start."""
    d = tmp_path_factory.mktemp(label)
    sock = str(d / "kvs.sock")
    err = open(d / "stderr", "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "unix:" + sock, "--host-capacity", "256M",
                      *kvs.KVSTASHD_EXTRA, *extra], stdout=err, stderr=err)
    for _ in range(400):
        if os.path.exists(sock + ".region") or proc.poll() is not None:
            break
        time.sleep(0.05)
    try:
        yield "unix:" + sock if proc.poll() is None else None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        err.close()


@pytest.fixture(scope="module")
def unix_daemon(tmp_path_factory):
    """A daemon on a Unix socket: its region socket is on, so batches use shared memory."""
    with _unix_daemon(tmp_path_factory, "pyunix") as target:
        assert target, "kvstashd exited at start"
        yield target


@pytest.fixture(scope="module")
def tcp(module_daemon):
    return module_daemon(host_capacity="256M").target


def blocks(n, t=16, L=2, H=2, D=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((L, 2, t, H, D)).astype(np.float16) for _ in range(n)]


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
def test_batches_round_trip_on_both_paths(request, where):
    target = request.getfixturevalue(where)
    with kvstash.Client(target) as c:
        name = kvs.ns_name("py")
        ns = c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        assert ns.block_bytes == 2 * 2 * 16 * 2 * 64 * 2
        keys = kvstash.block_keys(list(range(16 * 5 + 3)), 16)  # 5 full blocks + 3 tokens
        data = blocks(5) + blocks(1, t=3, seed=1)
        res = c.put_many(name, zip(keys, data))
        assert all(isinstance(r, kvstash.PutResult) for r in res)
        want = "shm" if where == "unix_daemon" else "grpc"
        assert c.last_path == want
        got = c.get_many(name, keys)
        assert c.last_path == want
        assert all(g.shape == d.shape and (g == d).all() for g, d in zip(got, data))
        n_present, tiers = c.lookup(name, keys)  # a GPU tier, when on, takes them first
        assert n_present == 6 and len(set(tiers)) == 1 and tiers[0] in ("host", "gpu")
        # prefix: stops at the first absent key
        assert c.delete(name, [keys[3]]) == 1
        pre = c.get_prefix(name, keys)
        assert len(pre) == 3 and all((a == b).all() for a, b in zip(pre, data))
        assert c.get_many(name, keys)[3] is None
        assert c.exists(name, keys[2:5]) == [True, False, True]
        one = c.get(name, keys[5])
        assert one.shape == (2, 2, 3, 2, 64) and (one == data[5]).all()
        st = c.stats()
        moved = st["data_plane"]["get_region_bytes"] if where == "unix_daemon" else \
            st["data_plane"]["get_wire_bytes"]
        assert moved > 0
        assert name in [n.name for n in c.namespaces()]
        assert c.drop_namespace(name) == 5


def test_errors_carry_status_and_message(tcp):
    with kvstash.Client(tcp) as c:
        with pytest.raises(kvstash.KvstashError) as e:
            c.namespace("no-such-namespace")
        assert e.value.status == "NOT_FOUND" and "no-such-namespace" in str(e.value)
        name = kvs.ns_name("pyerr")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           key_codec="polarquant")
        with pytest.raises(kvstash.KvstashError) as e:
            c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        assert e.value.status == "ALREADY_EXISTS"
        with pytest.raises(kvstash.KvstashError) as e:
            c.get(name, b"absent")
        assert e.value.status == "NOT_FOUND"
        bad = blocks(1)[0]
        bad[0, 0, 0, 0, 0] = np.nan  # a lossy codec refuses it: that block alone
        res = c.put_many(name, [(b"ok", blocks(1)[0]), (b"nan", bad)])
        assert isinstance(res[0], kvstash.PutResult)
        assert isinstance(res[1], kvstash.KvstashError) and res[1].status == "INVALID_ARGUMENT"
        with pytest.raises(ValueError, match="whole tokens"):
            c.put(name, b"x", np.zeros(10, np.float16))
        with pytest.raises(TypeError, match="2-byte"):
            c.put(name, b"x", np.zeros((2, 2, 16, 2, 64), np.float32))
        with pytest.raises(ValueError, match="key"):
            c.put(name, b"", blocks(1)[0])
        with pytest.raises(ValueError, match="dtype"):
            c.create_namespace("x", layers=1, kv_heads=1, head_dim=16, block_tokens=1,
                               dtype="fp32")
    with pytest.raises(kvstash.KvstashError) as e:
        kvstash.Client("127.0.0.1:1", timeout_ms=2000).stats()
    assert e.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_stats_admin_progress_follows_verify_and_flush(daemon, tmp_path):
    """stats()["admin"] mirrors the daemon's AdminProgress: a Verify of 12 host blocks adds
    12 planned and 12 checked, a Flush of them 12 queued and 12 done (the library's
    kvs_stats.admin, laid out as the C struct)."""
    d = daemon(extra=["--data-dir", tmp_path / "data", "--gpu-capacity", "0"])
    with kvstash.Client(d.target) as c:
        name = kvs.ns_name("pyadm")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        c.put_many(name, [(b"a%d" % i, x) for i, x in enumerate(blocks(12))])
        a0 = c.stats()["admin"]
        assert set(a0) == {"verify_planned", "verify_checked", "flush_queued", "flush_done"}
        assert d.kvctl("verify").returncode == 0
        a1 = c.stats()["admin"]
        assert (a1["verify_planned"] - a0["verify_planned"],
                a1["verify_checked"] - a0["verify_checked"]) == (12, 12)
        assert d.kvctl("flush").returncode == 0
        a2 = c.stats()["admin"]
        assert (a2["flush_queued"] - a1["flush_queued"],
                a2["flush_done"] - a1["flush_done"]) == (12, 12)


def test_unary_get_into_a_buffer_exact_short_and_size_probe(tcp):
    """libkvstash's kvs_client_get, under the package's get: a block of several data
    messages (3 MiB: the daemon sends at most 1 MiB a message) lands byte for byte in a
    buffer of exactly its size; a buffer one byte short is E2BIG naming both sizes, with
    nothing written; NULL with cap 0 asks the size (E2BIG naming it)."""
    from kvstash import _lib
    with kvstash.Client(tcp) as c:
        name = kvs.ns_name("pyget")
        c.create_namespace(name, layers=48, kv_heads=8, head_dim=128, block_tokens=16)
        blk = blocks(1, t=16, L=48, H=8, D=128, seed=5)[0]
        assert blk.nbytes == 3 << 20
        c.put(name, b"k", blk)

        def raw_get(buf, cap):
            res, err = _lib.GetResult(), _lib.Err()
            rc = c._c.get(c._h, name.encode(), b"k", 1, buf, cap, ctypes.byref(res),
                          ctypes.byref(err))
            return rc, res, err.msg.decode()

        out = np.zeros(blk.nbytes + 8, np.uint8)
        rc, res, _ = raw_get(out.ctypes.data, blk.nbytes)
        assert rc == 0 and res.bytes == blk.nbytes and res.tokens == 16
        assert out[:blk.nbytes].tobytes() == blk.tobytes() and not out[blk.nbytes:].any()
        out[:] = 0
        rc, _, msg = raw_get(out.ctypes.data, blk.nbytes - 1)
        assert rc == kvstash.client.E2BIG, msg
        assert f"block of {blk.nbytes} bytes" in msg and f"buffer of {blk.nbytes - 1}" in msg
        assert not out.any()
        rc, _, msg = raw_get(None, 0)
        assert rc == kvstash.client.E2BIG and f"block of {blk.nbytes} bytes" in msg


def test_block_keys_match_the_vector_file():
    """tests/data/key-vectors.txt: the file libkvstash and Python's xxhash are checked with."""
    vectors = list(kvs.key_vectors())
    assert len(vectors) >= 5
    for bt, toks, keys in vectors:
        assert [k.hex() for k in kvstash.block_keys(toks, bt)] == keys


def test_block_keys_match_the_readme_vectors():
    # README "Block keys" (also checked in C by tests/unit/test_keys.c)
    assert kvstash.block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[1].hex() == \
        "bad84e898fec8dace6ba4906880b0aa0"
    assert [k.hex() for k in kvstash.block_keys(list(range(100, 110)), 4)] == [
        "5743eca2e6cb4ff364968042efc1ab1c", "167dcada5e24693142f2d30914aa1ff9",
        "c9a792cae25cff850cfce1943543bd36"]


def test_bf16_and_torch_tensors(tcp):
    torch = pytest.importorskip("torch")
    with kvstash.Client(tcp) as c:
        name = kvs.ns_name("pybf")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           dtype="bf16")
        t = torch.randn(2, 2, 16, 2, 64, dtype=torch.bfloat16)
        c.put(name, b"t", t)
        got = c.get(name, b"t")
        assert torch.equal(torch.from_numpy(got.astype(np.int16)).view(torch.bfloat16), t)


def test_client_is_thread_safe(tcp):
    import threading
    with kvstash.Client(tcp) as c:
        name = kvs.ns_name("pythr")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        errors = []

        def work(i):
            try:
                data = blocks(4, seed=i)
                keys = [b"%d-%d" % (i, j) for j in range(4)]
                c.put_many(name, zip(keys, data))
                assert all((a == b).all() for a, b in zip(c.get_many(name, keys), data))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors, errors


def test_package_imports_with_debians_python():
    env = dict(os.environ, PYTHONPATH=os.path.join(kvs.REPO, "client", "python"))
    r = subprocess.run([sys.executable, "-c", "import kvstash; help(kvstash.Client)"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "get_prefix" in r.stdout and "shared memory" in r.stdout


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
def test_layer_ranges(request, where):
    """get/get_many with layers=: only those layers come back, equal to that slice of the
    block, on both paths; a bad range is refused naming the field."""
    with kvstash.Client(request.getfixturevalue(where)) as c:
        name = kvs.ns_name("pylay")
        c.create_namespace(name, layers=4, kv_heads=2, head_dim=64, block_tokens=16)
        data = blocks(3, L=4, seed=7)
        keys = [b"a", b"b", b"c"]
        c.put_many(name, zip(keys, data))
        for layers, sl in [(2, slice(2, 3)), ((1, 3), slice(1, 3)), (range(0, 4), slice(0, 4))]:
            one = c.get(name, b"b", layers=layers)
            assert one.shape == data[1][sl].shape and (one == data[1][sl]).all()
            got = c.get_many(name, keys, layers=layers)
            assert all((g == d[sl]).all() for g, d in zip(got, data))
        for bad in [(3, 3), (0, 5), -1, (2, 1)]:
            with pytest.raises(ValueError, match="layers"):
                c.get(name, b"a", layers=bad)
        with pytest.raises(TypeError, match="layers"):
            c.get_many(name, keys, layers="all")


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
def test_get_many_into_given_arrays_and_tensors(request, where):
    """out=: blocks land in the caller's arrays (numpy and CPU torch tensors, bf16 too) and
    the results are views of them; wrong destinations are refused naming out[i]."""
    torch = pytest.importorskip("torch")
    with kvstash.Client(request.getfixturevalue(where)) as c:
        name = kvs.ns_name("pyout")
        ns = c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                                dtype="bf16")
        src = [torch.randn(2, 2, 16, 2, 64, dtype=torch.bfloat16) for _ in range(3)]
        keys = [b"k0", b"k1", b"k2"]
        assert all(isinstance(r, kvstash.PutResult) for r in c.put_many(name, zip(keys, src)))
        outs = [torch.empty(2, 2, 16, 2, 64, dtype=torch.bfloat16),
                np.empty(ns.block_bytes // 2, np.uint16),
                torch.empty(ns.block_bytes // 2, dtype=torch.bfloat16)]
        got = c.get_many(name, keys + [b"absent"], out=outs + [np.empty(ns.block_bytes // 2,
                                                                         np.uint16)])
        assert got[3] is None
        assert torch.equal(outs[0], src[0]) and got[0].data_ptr() == outs[0].data_ptr()
        assert np.shares_memory(got[1], outs[1])
        assert torch.equal(torch.from_numpy(outs[1].view(np.int16)).view(torch.bfloat16),
                           src[1].reshape(-1))
        assert torch.equal(outs[2].view(2, 2, 16, 2, 64), src[2])
        one = torch.zeros(2, 2, 16, 2, 64, dtype=torch.bfloat16)
        assert c.get(name, b"k1", out=one).data_ptr() == one.data_ptr()
        assert torch.equal(one, src[1])
        with pytest.raises(ValueError, match=r"out\[1\] holds"):
            c.get_many(name, keys[:2], out=[outs[0], np.empty(10, np.uint16)])
        with pytest.raises(ValueError, match=r"out\[0\] must be contiguous"):
            c.get_many(name, keys[:1], out=[torch.empty(2, 2, 16, 64, 2,
                                                        dtype=torch.bfloat16).transpose(3, 4)])
        with pytest.raises(ValueError, match="3 keys"):
            c.get_many(name, keys, out=outs[:2])
        with pytest.raises(kvstash.KvstashError, match="NOT_FOUND"):
            c.get(name, b"absent", layers=0)


def test_block_keys_continue_from_a_parent():
    """block_keys(tail, parent=key of the block before) gives the keys the whole sequence
    would have, so a worker keys new blocks without re-hashing the prefix."""
    toks = list(range(1000, 1000 + 16 * 4 + 5))
    whole = kvstash.block_keys(toks, 16)
    assert kvstash.block_keys(toks[32:], 16, parent=whole[1]) == whole[2:]
    assert kvstash.block_keys(toks[:16], 16, parent=None) == whole[:1]
    with pytest.raises(ValueError, match="parent"):
        kvstash.block_keys(toks, 16, parent=b"short")
    with pytest.raises(ValueError, match="block_tokens"):
        kvstash.block_keys(toks, 0)
    with pytest.raises(ValueError, match="gpu_decode"):
        kvstash.Client("127.0.0.1:1", gpu_decode="yes")


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the GPU machine runs these: tests/gpu/device-check.sh)")
    return torch


def _has_gpu_engine(unix_target):
    """Whether a daemon started by the unix_daemon-style fixtures (stderr beside its socket)
    runs a GPU engine."""
    d = os.path.dirname(unix_target[len("unix:"):])
    with open(os.path.join(d, "stderr"), "rb") as f:
        return b"INFO GPU engine on " in f.read()


def _cuda_path(where, target):
    """The path CUDA tensors take with the default path="auto": by IPC with a daemon on
    this host that has a GPU engine (on GPU 0, the tests' device), shared memory with one
    that has none, gRPC bytes with the TCP daemon (no region socket)."""
    if where == "tcp":
        return "grpc"
    return "ipc" if _has_gpu_engine(target) else "shm"


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_tensors_round_trip(request, where, dtype):
    """CUDA tensors in and out, codec none: put_many from device memory, get_many into
    device tensors (no GPU decode: nothing to shrink), bit-exact, on both paths."""
    torch = _cuda_torch()
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    with kvstash.Client(request.getfixturevalue(where)) as c:
        name = kvs.ns_name("pycu")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           dtype=dtype)
        src = [torch.randn(2, 2, 16, 2, 64, device="cuda").to(tdt) for _ in range(4)]
        keys = [b"c%d" % i for i in range(4)]
        assert all(isinstance(r, kvstash.PutResult) for r in c.put_many(name, zip(keys, src)))
        path = _cuda_path(where, request.getfixturevalue(where))
        assert c.last_path == path
        outs = [torch.empty_like(s) for s in src]
        got = c.get_many(name, keys, out=outs)
        assert c.last_path == path
        assert all(torch.equal(o, s) for o, s in zip(outs, src))
        assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, outs))
        host = c.get(name, b"c2")  # the same bytes through a host array
        assert torch.equal(torch.from_numpy(host.view(np.int16)).cuda().view(tdt), src[2])
        part = c.get(name, b"c1", out=torch.empty_like(src[1]), layers=1)
        assert torch.equal(part, src[1][1:2])


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
@pytest.mark.parametrize("codec", ["kivi-4", "polarquant", "rotatekv-4"])
def test_cuda_gpu_decode_matches_daemon_decode(request, where, codec):
    """A compressing codec and CUDA destinations: with gpu_decode "on" (and "auto" for a
    remote daemon) the blocks come encoded and are decoded on this GPU (last_path says
    "+gpudecode"), to the very bytes the daemon's decode gives (every codec decodes
    byte-identically on CPU and GPU); "off" and a local "auto" leave it to the daemon (by
    IPC when it has a GPU engine)."""
    torch = _cuda_torch()
    target = request.getfixturevalue(where)
    with kvstash.Client(target) as c, kvstash.Client(target, gpu_decode="off") as off:
        name = kvs.ns_name("pygd")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           key_codec=codec, value_codec=codec)
        src = blocks(5, seed=11)
        keys = [b"g%d" % i for i in range(5)]
        c.put_many(name, zip(keys, src))
        want = c.get_many(name, keys)                       # decoded by the daemon, host
        outs = [torch.empty(2, 2, 16, 2, 64, dtype=torch.float16, device="cuda")
                for _ in keys]
        c.get_many(name, keys, out=outs)
        # "auto": decoded on this GPU for a remote daemon; a local one decodes into shared
        # memory itself (faster on the H100, RESULTS.md).
        path = "shm" if where == "unix_daemon" else "grpc"
        local = _cuda_path(where, target)
        assert c.last_path == (local if where == "unix_daemon" else path + "+gpudecode")
        for o, w in zip(outs, want):
            assert torch.equal(o.cpu(), torch.from_numpy(w)), codec
        with kvstash.Client(target, gpu_decode="on") as on:
            outs_on = [torch.empty_like(o) for o in outs]
            on.get_many(name, keys, out=outs_on)
            assert on.last_path == path + "+gpudecode"
            for o, w in zip(outs_on, want):
                assert torch.equal(o.cpu(), torch.from_numpy(w)), codec
        outs2 = [torch.empty_like(o) for o in outs]
        off.get_many(name, keys, out=outs2)
        assert off.last_path == local
        assert all(torch.equal(a, b) for a, b in zip(outs, outs2))
        pre = c.get_prefix(name, keys[:2] + [b"absent"] + keys[2:],
                           out=[torch.empty_like(outs[0]) for _ in range(6)])
        assert len(pre) == 2 and all(torch.equal(a, b) for a, b in zip(pre, outs))
        with kvstash.Client(target, gpu_decode="on") as on:
            o = torch.empty_like(outs[0])
            on.get(name, keys[0], out=o)  # one block, through get_many
            assert on.last_path == path + "+gpudecode" and torch.equal(o, outs[0])


def test_batches_larger_than_the_region_go_through_it_in_windows(unix_daemon):
    """A region of 3 blocks and batches of 10: put_many and get_many still take the shared
    memory path ("shm"), in several calls, with every block right; a prefix that ends in a
    later window stops there."""
    bb = 2 * 2 * 16 * 2 * 64 * 2
    with kvstash.Client(unix_daemon, shared_memory_bytes=3 * bb + 100) as c:
        name = kvs.ns_name("pywin")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        data = blocks(10, seed=3)
        keys = [b"w%d" % i for i in range(10)]
        before = c.stats()["rpcs"].get("PutMany", (0, 0))[0]
        res = c.put_many(name, zip(keys, data))
        assert c.last_path == "shm" and all(isinstance(r, kvstash.PutResult) for r in res)
        assert c.stats()["rpcs"]["PutMany"][0] - before == 4  # 3 + 3 + 3 + 1
        got = c.get_many(name, keys)
        assert c.last_path == "shm"
        assert all((g == d).all() for g, d in zip(got, data))
        c.delete(name, [keys[7]])
        pre = c.get_prefix(name, keys)
        assert len(pre) == 7 and all((g == d).all() for g, d in zip(pre, data))
        assert c.get_many(name, keys)[7] is None


@pytest.mark.parametrize("where", ["tcp", "unix_daemon"])
def test_a_namespace_recreated_with_another_shape_is_seen(request, where):
    """Client A caches a namespace's spec; client B drops it and creates it again with twice
    the layers. A's next put, get and get_many work with the new shape (the cache is asked
    again once when sizes do not fit it) instead of refusing or mis-shaping blocks."""
    target = request.getfixturevalue(where)
    name = kvs.ns_name("pyre")
    with kvstash.Client(target) as a, kvstash.Client(target) as b:
        a.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        a.put(name, b"old", blocks(1, L=2)[0])
        assert a.get(name, b"old").shape == (2, 2, 16, 2, 64)
        b.drop_namespace(name)
        b.create_namespace(name, layers=4, kv_heads=2, head_dim=64, block_tokens=16)
        new = blocks(3, L=4, seed=5)
        b.put(name, b"n0", new[0])
        got = a.get(name, b"n0")
        assert got.shape == (4, 2, 16, 2, 64) and (got == new[0]).all()
        a.put(name, b"n1", new[1])                      # A's cached spec said 2 layers
        assert isinstance(a.put_many(name, [(b"n2", new[2])])[0], kvstash.PutResult)
        many = a.get_many(name, [b"n0", b"n1", b"n2"])
        assert all(g.shape == (4, 2, 16, 2, 64) and (g == d).all() for g, d in zip(many, new))


# ------------------------------------------------------------------ CUDA IPC (issue 12 item 3)
EINVAL, ENOTSUP = -30001, -30012
FAKE_HANDLE, FAKE_UUID = bytes(range(64)), bytes(range(100, 116))
E = 2 * 2 * 16 * 2 * 64  # elements of one block of the tests' namespaces


def _create_ipc(client, handle=FAKE_HANDLE, uuid=FAKE_UUID, offset=0, nbytes=1 << 20):
    """kvs_region_create_ipc called through ctypes: (rc, message, region)."""
    r, err = ctypes.c_void_p(), kvstash._lib.Err()
    rc = kvstash._lib.lib.kvs_region_create_ipc(client._h, handle, offset, nbytes, uuid,
                                                ctypes.byref(r), ctypes.byref(err))
    return rc, err.msg.decode(errors="replace"), r


def test_cuda_ipc_registration_refused_without_a_gpu_engine(unix_daemon, tcp):
    """kvs_region_create_ipc with a made-up handle and UUID (no CUDA needed): a daemon on
    this host without a GPU engine answers KVS_ENOTSUP naming it, and the package's registry
    remembers the answer and does not ask again (CUDA tensors then go through shared
    memory); with an engine (the GPU machine's runs) the handle is refused, KVS_EINVAL,
    remembered for that device. No region socket (the TCP daemon): KVS_ENOTSUP."""
    engine = _has_gpu_engine(unix_daemon)
    with kvstash.Client(unix_daemon, path="grpc") as c:
        refused0 = c.stats()["data_plane"]["region_refused"]
        rc, msg, r = _create_ipc(c)
        assert not r.value
        if engine:
            assert rc == EINVAL, (rc, msg)
        else:
            assert rc == ENOTSUP, (rc, msg)
            assert "GPU engine" in msg
        refused1 = c.stats()["data_plane"]["region_refused"]
        assert refused1 == refused0 + 1
        reg = kvstash._ipc.Registry(4)
        for _ in range(2):  # the second is answered from memory
            with pytest.raises(kvstash._ipc.Unavailable) as e:
                reg.register(c._h, FAKE_HANDLE, 0, 1 << 20, FAKE_UUID, device=0)
            assert (e.value.code, e.value.msg) == (rc, msg)
        assert c.stats()["data_plane"]["region_refused"] == refused1 + 1
        assert (reg.refused, reg.bad_devices) == ((None, {0: msg}) if engine else (msg, {}))
        assert len(reg) == 0
    with kvstash.Client(tcp) as c:
        rc, msg, r = _create_ipc(c)
        assert rc == ENOTSUP and "region socket" in msg and not r.value


def test_cuda_ipc_handle_forms_and_path_options():
    """The handle in torch's _share_cuda_() tuple: the bare 64-byte cudaIpcMemHandle_t, or
    [version][type]['c' payload] from newer torch; an expandable segment's ('e') has none.
    The path options are checked when the Client is made."""
    h, f = bytes(range(64)), kvstash._ipc.cuda_ipc_handle
    assert f(h) == h
    assert f(b"\x02c" + h) == h and f(b"\x03c" + h) == h
    assert f(b"\x02e" + h) is None and f(b"\x02e" + h + b"segment") is None
    assert f(None) is None and f(h[:10]) is None
    with pytest.raises(ValueError, match="path"):
        kvstash.Client("127.0.0.1:1", path="rdma")
    with pytest.raises(ValueError, match="gpu_decode"):
        kvstash.Client("127.0.0.1:1", path="ipc", gpu_decode="on")
    with pytest.raises(ValueError, match="ipc_registrations"):
        kvstash.Client("127.0.0.1:1", ipc_registrations=0)


def test_path_option_forces_a_path(unix_daemon, tcp):
    """path="grpc" moves the bytes over gRPC with a daemon on this host too; "shm" takes
    shared memory or fails (UNIMPLEMENTED, with libkvstash's reason: a daemon without a
    region socket, a block larger than the region); "ipc" leaves host arrays to the usual
    path."""
    data, keys = blocks(3, seed=21), [b"p0", b"p1", b"p2"]
    with kvstash.Client(unix_daemon, path="grpc") as g, \
            kvstash.Client(unix_daemon, path="shm") as s, \
            kvstash.Client(unix_daemon, path="ipc") as i:
        name = kvs.ns_name("pypath")
        g.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        wire = g.stats()["data_plane"]["put_wire_bytes"]
        assert all(isinstance(r, kvstash.PutResult) for r in g.put_many(name, zip(keys, data)))
        assert g.last_path == "grpc"
        assert g.stats()["data_plane"]["put_wire_bytes"] >= wire + sum(d.nbytes for d in data)
        for c, want in ((s, "shm"), (i, "shm"), (g, "grpc")):
            got = c.get_many(name, keys)
            assert c.last_path == want and all((a == b).all() for a, b in zip(got, data))
        i.put_many(name, zip(keys, data))
        assert i.last_path == "shm"
        with kvstash.Client(unix_daemon, path="shm", shared_memory_bytes=1000) as small:
            with pytest.raises(kvstash.KvstashError) as e:
                small.put_many(name, zip(keys, data))
            assert e.value.status == "UNIMPLEMENTED" and "shared_memory_bytes" in str(e.value)
    with kvstash.Client(tcp, path="shm") as s:
        name = kvs.ns_name("pypath")
        s.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        with pytest.raises(kvstash.KvstashError) as e:
            s.get_many(name, keys)
        assert e.value.status == "UNIMPLEMENTED" and "region socket" in str(e.value)


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    """A daemon on this host with a GPU engine (--gpu on, GPU 0: the tests' device), so CUDA
    tensors go by IPC. Skipped without CUDA here, or when kvstashd cannot start an engine."""
    _cuda_torch()
    with _unix_daemon(tmp_path_factory, "pyipc", "--gpu", "on") as target:
        if target is None:
            pytest.skip("kvstashd --gpu on did not start")
        yield target


@pytest.fixture(scope="module")
def cpu_unix_daemon(tmp_path_factory):
    """A daemon on this host without a GPU engine (--gpu off)."""
    with _unix_daemon(tmp_path_factory, "pynogpu", "--gpu", "off") as target:
        assert target, "kvstashd --gpu off exited at start"
        yield target


def _bits(x):
    """The 2-byte elements of a numpy array or tensor, flat, as a CPU int16 tensor (exact
    equality, NaN bits included; shapes are checked apart)."""
    import torch
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).reshape(-1)
    return x.detach().contiguous().cpu().view(torch.int16).reshape(-1)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_ipc_round_trip_is_byte_identical_to_grpc(gpu_daemon, dtype):
    """Codec none, path="ipc": put_many from CUDA tensors and get_many into CUDA tensors
    (the daemon's engine reading and writing this process's memory) store and return the
    very bytes of the gRPC bytes path, both ways; a partial block, a layer range and a prefix
    that stops at an absent key too, with destinations in separate storages (one GetMany
    per storage)."""
    torch = _cuda_torch()
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    with kvstash.Client(gpu_daemon, path="ipc") as c, \
            kvstash.Client(gpu_daemon, path="grpc") as g:
        name = kvs.ns_name("pyipc")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           dtype=dtype)
        src = [torch.randn(2, 2, 16, 2, 64, device="cuda").to(tdt) for _ in range(4)]
        src.append(torch.randn(2, 2, 3, 2, 64, device="cuda").to(tdt))  # a partial block
        keys = [b"i%d" % i for i in range(5)]
        res = c.put_many(name, zip(keys, src))
        assert c.last_path == "ipc" and all(isinstance(r, kvstash.PutResult) for r in res)
        stored = g.get_many(name, keys)
        assert g.last_path == "grpc"
        for h, s in zip(stored, src):
            assert h.shape == tuple(s.shape) and torch.equal(_bits(h), _bits(s))
        outs = [torch.empty(2, 2, 16, 2, 64, dtype=tdt, device="cuda") for _ in keys]
        got = c.get_many(name, keys, out=outs)
        assert c.last_path == "ipc"
        for o, x, s in zip(outs, got, src):
            assert x.shape == s.shape and x.data_ptr() == o.data_ptr()
            assert torch.equal(_bits(x), _bits(s))
        host = torch.randn(2, 2, 16, 2, 64).to(tdt)  # stored over gRPC, fetched by IPC
        g.put_many(name, [(b"h", host)])
        o = torch.empty(2, 2, 16, 2, 64, dtype=tdt, device="cuda")
        assert torch.equal(_bits(c.get(name, b"h", out=o)), _bits(host))
        assert c.last_path == "ipc"
        part = c.get(name, keys[1], out=torch.empty_like(outs[0]), layers=1)
        assert c.last_path == "ipc" and part.shape == (1, 2, 16, 2, 64)
        assert torch.equal(_bits(part), _bits(src[1][1:2]))
        pre = c.get_prefix(name, keys[:2] + [b"absent"] + keys[2:],
                           out=[torch.empty_like(outs[0]) for _ in range(6)])
        assert len(pre) == 2 and all(torch.equal(_bits(p), _bits(s)) for p, s in zip(pre, src))


@pytest.mark.parametrize("codec", ["polarquant", "kivi-2"])
def test_ipc_matches_shared_memory_for_lossy_codecs(gpu_daemon, codec):
    """A compressing codec: blocks encoded from CUDA tensors by IPC equal those encoded from
    the same tensors through shared memory, and get_many into CUDA tensors by IPC gives the
    very values the shared-memory path gives (the daemon's engine decodes either way)."""
    torch = _cuda_torch()
    with kvstash.Client(gpu_daemon, path="ipc") as c, \
            kvstash.Client(gpu_daemon, path="shm") as s:
        name = kvs.ns_name("pyipcq")
        c.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16,
                           key_codec=codec, value_codec=codec)
        dev = [torch.from_numpy(b).cuda() for b in blocks(4, seed=31)]
        ki, ks = [b"ipc%d" % i for i in range(4)], [b"shm%d" % i for i in range(4)]
        assert all(isinstance(r, kvstash.PutResult) for r in c.put_many(name, zip(ki, dev)))
        assert c.last_path == "ipc"
        assert all(isinstance(r, kvstash.PutResult) for r in s.put_many(name, zip(ks, dev)))
        assert s.last_path == "shm"
        by_ipc, by_shm = s.get_many(name, ki), s.get_many(name, ks)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(by_ipc, by_shm)), codec
        outs_i = [torch.empty_like(d) for d in dev]
        outs_s = [torch.empty_like(d) for d in dev]
        c.get_many(name, ki, out=outs_i)
        assert c.last_path == "ipc"
        s.get_many(name, ki, out=outs_s)
        assert s.last_path == "shm"
        for a, b, h in zip(outs_i, outs_s, by_ipc):
            assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a), _bits(h)), codec


def _allocation_offset(torch, t):
    """Where t's memory lies in the cudaMalloc allocation (torch's segment) holding it."""
    p = t.data_ptr()
    for seg in torch.cuda.memory_snapshot():
        if seg["address"] <= p < seg["address"] + seg["total_size"]:
            return p - seg["address"]
    raise AssertionError("tensor in no segment of torch's allocator")


def test_ipc_into_and_from_slices_of_a_larger_tensor(gpu_daemon):
    """Destinations and a source that are views at nonzero offsets of one larger tensor,
    itself not at the start of its cudaMalloc allocation: one registration for its storage
    (offset in the allocation from _share_cuda_), each block at its own byte offset in the
    storage, the bytes around them untouched."""
    torch = _cuda_torch()
    with kvstash.Client(gpu_daemon, path="ipc") as c, \
            kvstash.Client(gpu_daemon, path="grpc") as g:
        name = kvs.ns_name("pyipcoff")
        g.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        data = [torch.randn(2, 2, 16, 2, 64).half() for _ in range(2)]
        g.put_many(name, zip([b"s0", b"s1"], data))
        keep = []  # small tensors share torch's 2 MiB segments: one lands past the start
        for _ in range(32):
            big = torch.full((3 * E + 100,), 7.0, dtype=torch.float16, device="cuda")
            if _allocation_offset(torch, big) > 0:
                break
            keep.append(big)
        assert _allocation_offset(torch, big) > 0
        o1, o0 = big[100:100 + E], big[100 + E:100 + 2 * E]  # key order reversed in memory
        got = c.get_many(name, [b"s0", b"s1"], out=[o0, o1])
        assert c.last_path == "ipc" and len(c._ipc) == 1
        assert got[0].data_ptr() == o0.data_ptr() and got[1].data_ptr() == o1.data_ptr()
        assert torch.equal(_bits(o0), _bits(data[0])) and torch.equal(_bits(o1), _bits(data[1]))
        assert bool((big[:100] == 7).all()) and bool((big[100 + 2 * E:] == 7).all())
        c.put_many(name, [(b"s2", big[100 + E:100 + 2 * E].view(2, 2, 16, 2, 64))])
        assert c.last_path == "ipc" and len(c._ipc) == 1
        assert torch.equal(_bits(g.get(name, b"s2")), _bits(data[0]))


def test_ipc_registrations_are_bounded_and_closed_with_the_client(gpu_daemon):
    """A storage is registered once (the daemon counts it in data_plane.regions) and held
    while registered; past ipc_registrations the least recently used is closed (never one
    the current call uses); close() closes the rest, after which the tensors' memory goes
    back to torch's allocator when they are dropped (torch's IPC ref counter released: no
    limbo)."""
    torch = _cuda_torch()
    with kvstash.Client(gpu_daemon, path="grpc") as obs:
        name = kvs.ns_name("pyipcreg")
        obs.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        data, keys = blocks(3, seed=41), [b"r0", b"r1", b"r2"]
        obs.put_many(name, zip(keys, data))

        def regions():
            return obs.stats()["data_plane"]["regions"]
        r0 = regions()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        c = kvstash.Client(gpu_daemon, path="ipc", ipc_registrations=2)
        outs = [torch.empty(2, 2, 16, 2, 64, dtype=torch.float16, device="cuda")
                for _ in keys]  # three storages
        c.get_many(name, keys, out=outs)
        assert c.last_path == "ipc" and len(c._ipc) == 3  # all in use by that call
        assert regions() == r0 + 3
        c.get_many(name, keys[:1], out=outs[:1])  # outs[1], least recently used, goes
        assert len(c._ipc) == 2
        kvs.wait_for(lambda: regions() == r0 + 2, "the daemon dropping a closed registration")
        assert all(torch.equal(_bits(o), _bits(d)) for o, d in zip(outs, data))
        c.close()
        assert len(c._ipc) == 0
        kvs.wait_for(lambda: regions() == r0, "the daemon dropping the client's registrations")
        del outs
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base


def test_ipc_falls_back_and_forced_ipc_says_why(gpu_daemon, cpu_unix_daemon):
    """path="auto" takes IPC for contiguous CUDA tensors and shared memory otherwise (a
    strided tensor, CUDA tensors mixed with host arrays, a daemon without a GPU engine,
    which is then not asked again); path="ipc" refuses those: ValueError for the call's
    data, UNIMPLEMENTED naming the GPU engine for the daemon."""
    torch = _cuda_torch()
    src = [torch.randn(2, 2, 16, 2, 64, device="cuda").half() for _ in range(2)]
    strided = torch.randn(2, 2, 16, 64, 2, device="cuda").half().transpose(3, 4)
    keys = [b"a0", b"a1"]
    with kvstash.Client(gpu_daemon) as a, kvstash.Client(gpu_daemon, path="ipc") as f:
        name = kvs.ns_name("pyipcfb")
        a.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        a.put_many(name, zip(keys, src))
        assert a.last_path == "ipc"
        a.put_many(name, [(b"st", strided)])
        assert a.last_path == "shm"
        a.put_many(name, [(b"m0", src[0]), (b"m1", blocks(1)[0])])
        assert a.last_path == "shm"
        a.put(name, b"one", src[1])  # through put_many: IPC
        assert a.last_path == "ipc"
        o = torch.empty_like(src[0])
        assert torch.equal(_bits(a.get(name, b"st", out=o)), _bits(strided))
        assert a.last_path == "ipc"
        with pytest.raises(ValueError, match="contiguous"):
            f.put_many(name, [(b"st", strided)])
        with pytest.raises(ValueError, match=r"blocks\[1\]"):
            f.put_many(name, [(b"m0", src[0]), (b"m1", blocks(1)[0])])
        with pytest.raises(ValueError, match=r"out\[0\]"):
            f.get_many(name, keys, out=[np.empty(E, np.float16), torch.empty_like(src[0])])
    with kvstash.Client(cpu_unix_daemon) as a, kvstash.Client(cpu_unix_daemon, path="ipc") as f:
        name = kvs.ns_name("pyipcfb")
        a.create_namespace(name, layers=2, kv_heads=2, head_dim=64, block_tokens=16)
        a.put_many(name, zip(keys, src))
        assert a.last_path == "shm" and "GPU engine" in a._ipc.refused
        refused = a.stats()["data_plane"]["region_refused"]
        outs = [torch.empty_like(s) for s in src]
        a.get_many(name, keys, out=outs)
        assert a.last_path == "shm" and a.stats()["data_plane"]["region_refused"] == refused
        assert all(torch.equal(_bits(o), _bits(s)) for o, s in zip(outs, src))
        with pytest.raises(kvstash.KvstashError) as e:
            f.put_many(name, zip(keys, src))
        assert e.value.status == "UNIMPLEMENTED" and "GPU engine" in str(e.value)


# ------------------------------------------------------------------ paged layouts, C API
@pytest.mark.parametrize("hnd", [False, True])
def test_paged_put_many_and_get_many_through_libkvstash(unix_daemon, hnd):
    """kvs_client_put_many_paged and kvs_get_many_opts.layout (the C API of paged layouts,
    issue 12 item 4; the wire's own test is test_data_plane's): blocks stored from pages of a
    shared-memory region equal the reference gather of those pages (read back by a plain
    Get); a GetMany into the other pages writes there exactly what was gathered, and leaves
    the pages it was not given as they were (vLLM's layout, NHD and HND: every byte of the
    region is in some page). Refused on the client, naming the field: pages without a layout,
    a layout without bases, a paged GetMany without pages."""
    from test_data_plane import ref_gather, vllm_layout
    lib = kvstash._lib
    L, H, D, T, NB = 2, 2, 64, 16, 6
    lay, nbytes = vllm_layout(L, 2 * NB, T, H, D, hnd=hnd)
    with kvstash.Client(unix_daemon) as c:
        name = kvs.ns_name("pypaged")
        c.create_namespace(name, layers=L, kv_heads=H, head_dim=D, block_tokens=T)
        r, err = ctypes.c_void_p(), lib.Err()
        assert lib.lib.kvs_region_create(c._h, nbytes, ctypes.byref(r), ctypes.byref(err)) == 0, \
            err.msg
        try:
            mem = (ctypes.c_uint8 * nbytes).from_address(lib.lib.kvs_region_data(r))
            a = np.frombuffer(mem, dtype="<u2")
            a[:] = np.random.default_rng(3).integers(0, 0x7800, a.size, dtype=np.uint16)
            kb, vb = (ctypes.c_uint64 * L)(*lay.k_base), (ctypes.c_uint64 * L)(*lay.v_base)
            pl = lib.PageLayout(T, L, kb, vb, lay.page_stride, lay.token_stride,
                                lay.head_stride)
            keys = [b"pg%d" % i for i in range(NB)]
            src_pages = [(ctypes.c_uint32 * 1)(2 * i + 1) for i in range(NB)]  # odd pages
            items = (lib.PutItem * NB)()
            for it, k, p in zip(items, keys, src_pages):
                it.key, it.key_len = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p), len(k)
                it.tokens, it.region, it.pages, it.n_pages = T, r, p, 1

            def put(layout):
                return lib.lib.kvs_client_put_many_paged(c._h, name.encode(), 1, layout,
                                                         items, NB, ctypes.byref(err))
            assert put(None) == EINVAL and "layout" in err.msg.decode()
            empty = lib.PageLayout(T, 0, None, None, 0, 0, 0)
            assert put(ctypes.byref(empty)) == EINVAL and "layers" in err.msg.decode()
            assert put(ctypes.byref(pl)) == 0, err.msg
            assert [it.rc for it in items] == [0] * NB, [it.msg for it in items]
            before = bytes(mem)
            for i, k in enumerate(keys):
                assert c.get(name, k).tobytes() == \
                    ref_gather(before, lay, [2 * i + 1], T, L, H, D), i
            gi = (lib.GetItem * NB)()
            for it, k in zip(gi, keys):
                it.key, it.key_len = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p), len(k)
                it.region = r
            dst = (ctypes.c_uint32 * NB)(*[2 * i for i in range(NB)])  # even pages
            served = ctypes.c_size_t()

            def get(pages, n_pages):
                opts = lib.GetManyOpts(0, 0, 0, False, 0, ctypes.pointer(pl), pages, n_pages)
                return lib.lib.kvs_client_get_many(c._h, name.encode(), gi, NB,
                                                   ctypes.byref(opts), ctypes.byref(served),
                                                   ctypes.byref(err))
            assert get(None, 0) == EINVAL and "pages" in err.msg.decode()
            assert get(dst, NB) == 0, err.msg
            assert [it.rc for it in gi] == [0] * NB and served.value == NB
            after = bytes(mem)
            for i in range(NB):
                assert ref_gather(after, lay, [2 * i], T, L, H, D) == \
                    ref_gather(before, lay, [2 * i + 1], T, L, H, D), i
                assert ref_gather(after, lay, [2 * i + 1], T, L, H, D) == \
                    ref_gather(before, lay, [2 * i + 1], T, L, H, D), i
        finally:
            lib.lib.kvs_region_close(r)


@pytest.mark.parametrize("kind", ["vllm", "vllm-hnd", "sglang", "torch"])
def test_put_many_paged_and_get_many_paged(unix_daemon, kind):
    """Client.put_many_paged / get_many_paged with a host cache (numpy, or a CPU tensor:
    gathered and scattered by the package; a CUDA cache on the daemon's GPU goes by IPC, the
    GPU machine's runs): each block stored equals the reference gather of its pages, is
    restored into other pages bit for bit, a partial block fills only its tokens, a prefix
    restore stops at the first absent key and touches nothing after it, and bad arguments
    are refused naming the field before anything is sent."""
    from test_data_plane import ref_gather
    L, H, D, T, NP = 2, 2, 64, 16, 12
    lay = {"vllm": kvstash.PageLayout.vllm(L, NP, T, H, D),
           "vllm-hnd": kvstash.PageLayout.vllm(L, NP, T, H, D, hnd=True),
           "sglang": kvstash.PageLayout.sglang_page_first(L, T, H, D),
           "torch": kvstash.PageLayout.vllm(L, NP, T, H, D)}[kind]
    cache = np.random.default_rng(7).integers(0, 0x7800, L * 2 * NP * T * H * D,
                                              dtype=np.uint16).view(np.float16)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        cache = torch.from_numpy(cache)
    raw = (cache.numpy() if kind == "torch" else cache).view(np.uint8)  # a view: follows writes
    with kvstash.Client(unix_daemon) as c:
        name = kvs.ns_name("pypg")
        c.create_namespace(name, layers=L, kv_heads=H, head_dim=D, block_tokens=T)
        keys = [b"k%d" % i for i in range(4)]
        res = c.put_many_paged(name, keys, cache, lay, [[2 * i + 1] for i in range(4)],
                               tokens=[T, T, T, 5])
        assert all(isinstance(r, kvstash.PutResult) for r in res), res
        before = bytes(raw)
        for i, k in enumerate(keys):
            t = 5 if i == 3 else T
            assert c.get(name, k).tobytes() == \
                ref_gather(before, lay, [2 * i + 1], t, L, H, D), i
        assert c.get_many_paged(name, keys, cache, lay, [[2 * i] for i in range(4)]) == 4
        after = bytes(raw)
        for i in range(4):
            got = np.frombuffer(ref_gather(after, lay, [2 * i], T, L, H, D), "<u2")
            want = np.frombuffer(ref_gather(before, lay, [2 * i], T, L, H, D), "<u2").copy()
            src = np.frombuffer(ref_gather(before, lay, [2 * i + 1], T, L, H, D), "<u2")
            t = 5 if i == 3 else T
            want = want.reshape(L, 2, T, H, D)
            want[:, :, :t] = src.reshape(L, 2, T, H, D)[:, :, :t]  # a partial block: its tokens
            assert (got.reshape(L, 2, T, H, D) == want).all(), i
            assert ref_gather(after, lay, [2 * i + 1], T, L, H, D) == \
                ref_gather(before, lay, [2 * i + 1], T, L, H, D), i
        # Prefix: k0, then an absent key; page 9 stays as it was.
        snap = bytes(raw)
        assert c.get_many_paged(name, [b"k0", b"absent", b"k1"], cache, lay,
                                [[8], [9], [10]], prefix=True) == 1
        assert ref_gather(bytes(raw), lay, [9], T, L, H, D) == ref_gather(snap, lay, [9], T, L,
                                                                            H, D)
        with pytest.raises(kvstash.KvstashError) as e:
            c.get_many_paged(name, [b"absent"], cache, lay, [[8]])
        assert e.value.code == -30002  # KVS_ENOTFOUND
        for pages, words in (([[NP]], "pages[0]"), ([[0, 1]], "pages"), ([[]], "pages"),
                             ([0], "one list of page ids per key")):
            with pytest.raises(ValueError) as e:
                c.put_many_paged(name, [b"x"], cache, lay, pages)
            assert words in str(e.value), str(e.value)
        with pytest.raises(ValueError, match="tokens"):
            c.put_many_paged(name, [b"x"], cache, lay, [[0]], tokens=T + 1)
        strided = (cache.numpy() if kind == "torch" else cache)[::2]
        with pytest.raises(ValueError, match="contiguous"):
            c.put_many_paged(name, [b"x"], strided, lay, [[0]])


def _received_per_connection(port):
    """Bytes received so far by each of this process's TCP connections to `port` (the
    package's client lives in this process), from the kernel (TCP_INFO's bytes_received)."""
    import socket
    import stat
    import struct
    got = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with s:
            try:
                if s.type != socket.SOCK_STREAM or s.getpeername()[1] != port:
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except (OSError, IndexError, TypeError):
                continue
            got.append(struct.unpack_from("=Q", info, 128)[0])  # tcpi_bytes_received
    return got


def _mib_blocks(n, seed):
    rng = np.random.default_rng(seed)  # L=4 H=8 D=128 T=64: 1 MiB each
    return [rng.standard_normal((4, 2, 64, 8, 128)).astype(np.float16) for _ in range(n)]


def test_get_many_split_over_connections(daemon):
    """Client(connections=4): a batched get of 8 MiB or more goes in four parts, one per
    connection (the kernel's table shows four connections after one call; a smaller get
    leaves it at two), and answers as one call would: every block, an absent key as None,
    and a prefix get stopping at the first miss even when a later part found all its keys
    (they are left unanswered)."""
    d = daemon(host_capacity="256M")
    port = int(d.target.rsplit(":", 1)[1])
    name = kvs.ns_name("split")
    keys = [b"k%02d" % i for i in range(16)]
    data = _mib_blocks(16, seed=3)
    with kvstash.Client(d.target) as w:
        w.create_namespace(name, layers=4, kv_heads=8, head_dim=128, block_tokens=64)
        present = [i for i in range(16) if i != 9]
        assert all(isinstance(r, kvstash.PutResult)
                   for r in w.put_many(name, [(keys[i], data[i]) for i in present]))

    def carried(at_least=3 << 20):  # connections that received a part's worth or more
        return sum(b >= at_least for b in _received_per_connection(port))

    with kvstash.Client(d.target, connections=4) as c:
        got = c.get_many(name, keys[:4])  # 4 MiB: one call on one connection
        assert all((g == data[i]).all() for i, g in enumerate(got))
        assert carried() == 1
    with kvstash.Client(d.target, connections=4) as c:
        got = c.get_many(name, keys)  # 16 MiB: four parts of 4 keys (3.75-4 MiB each)
        assert carried() == 4, _received_per_connection(port)
        assert got[9] is None
        assert all((got[i] == data[i]).all() for i in present)
        # Prefix: part 2 stops at key 9; part 3 found all of 12-15, which must not show.
        pre = c.get_prefix(name, keys)
        assert len(pre) == 9 and all((pre[i] == data[i]).all() for i in range(9))
        assert len(c.get_many(name, keys, prefix=True)) == 9
        # A miss in the first part: nothing after it, though the other parts answered.
        pre = c.get_prefix(name, [keys[0], b"absent"] + keys[2:9] + keys[10:])
        assert len(pre) == 1 and (pre[0] == data[0]).all()

    # libkvstash's own answer to a C caller: *served and each item's answered flag.
    from kvstash import _lib
    opts = _lib.ClientOpts(d.target.encode(), None, 0, 0, 0, None, None, None, None, 4)
    h, err = ctypes.c_void_p(), _lib.Err()
    assert _lib.lib.kvs_client_connect(ctypes.byref(opts), ctypes.byref(h),
                                       ctypes.byref(err)) == 0, err.msg
    try:
        bufs = [ctypes.create_string_buffer(1 << 20) for _ in keys]
        items = (_lib.GetItem * 16)()
        for it, k, b in zip(items, keys, bufs):
            it.key, it.key_len = ctypes.cast(ctypes.c_char_p(k), ctypes.c_void_p), len(k)
            it.buf, it.cap = ctypes.addressof(b), 1 << 20
        served = ctypes.c_size_t()
        for prefix, want in ((True, 9), (False, 15)):
            mo = _lib.GetManyOpts(prefix=prefix)
            rc = _lib.lib.kvs_client_get_many(h, name.encode(), items, 16, ctypes.byref(mo),
                                              ctypes.byref(served), ctypes.byref(err))
            assert rc == 0 and served.value == want, (rc, err.msg, served.value)
            answered = [it.answered for it in items]
            if prefix:
                assert answered == [True] * 9 + [False] * 7
            else:
                # every item answered, the absent one with its error
                assert all(answered) and items[9].rc != 0 and b"not found" in items[9].msg
            assert all(bytes(bufs[i]) == data[i].tobytes() for i in range(9))
    finally:
        _lib.lib.kvs_client_close(h)


def test_connections_option_is_checked():
    with pytest.raises(ValueError, match="connections"):
        kvstash.Client("127.0.0.1:1", connections=0)
    with pytest.raises(ValueError, match="connections"):
        kvstash.Client("127.0.0.1:1", connections=17)
    # libkvstash's own check, for C callers (the package checks first).
    from kvstash import _lib
    opts = _lib.ClientOpts(b"127.0.0.1:1", None, 0, 0, 0, None, None, None, None, 17)
    h, err = ctypes.c_void_p(), _lib.Err()
    rc = _lib.lib.kvs_client_connect(ctypes.byref(opts), ctypes.byref(h), ctypes.byref(err))
    assert rc != 0 and b"connections: 17" in err.msg

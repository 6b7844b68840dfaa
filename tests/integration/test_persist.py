"""Disk tier and restart (DESIGN §7): blocks past the host tier go to disk and come back
byte-exact; after SIGTERM (host blocks flushed) and a start on the same --data-dir, every
namespace and block is there again (codecs none and kivi-2), and so is every learned codec
state version (RotateKV's calibrated permutation, SQuat's query Grams), so their blocks decode
exactly as before; a data directory that is not ours is refused at start with a clear message
and left as it was."""
import os
import subprocess

import numpy as np

import kvs
from kvs import pb

TIER_DISK = pb.TIER_DISK

L, H, D, T = 4, 2, 64, 16


def keys_of(n):
    return [f"p{i}".encode() for i in range(n)]


def test_disk_tier_and_restart(daemon, tmp_path):
    data = str(tmp_path / "data")
    # A spill queue as large as what is put: no victim can be dropped however slow the disk
    # writer (fdatasync per batch) is here.
    extra = ["--data-dir", data, "--stats-interval", "0", "--spill-queue", "2M"]
    d = daemon(host_capacity="256K", extra=extra)
    tiers = {t.tier for t in d.stats().tiers}
    assert TIER_DISK in tiers
    spaces = {}
    for codec in ("none", "kivi-2"):
        ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec=codec,
                                value_codec=codec))
        keys = keys_of(24)
        for i, k in enumerate(keys):
            kvs.put(d.stub, ns.name, k, T, ns.payload(T, seed=i))
        got = {k: kvs.get(d.stub, ns.name, k).data for k in keys}
        if codec == "none":
            assert all(got[k] == ns.payload(T, seed=i) for i, k in enumerate(keys))
        spaces[ns.name] = got
    lk = d.stub.Lookup(pb.KeysRequest(namespace=list(spaces)[0], keys=keys_of(24)), timeout=10)
    assert lk.prefix_blocks == 24
    disk = [t for t in d.stats().tiers if t.tier == TIER_DISK][0]
    assert disk.blocks > 0 or d.has_gpu_tier()  # with a GPU tier they all fit there
    d.stop()
    assert "flushed" in d.stderr_text()

    d2 = daemon(host_capacity="256K", extra=extra)
    assert "restored 2 namespaces" in d2.stderr_text()
    names = {n.spec.name for n in d2.stats().namespaces}
    assert names == set(spaces)
    for name, got in spaces.items():
        lk = d2.stub.Lookup(pb.KeysRequest(namespace=name, keys=list(got)), timeout=10)
        assert lk.prefix_blocks == len(got)
        for k, v in got.items():
            assert kvs.get(d2.stub, name, k).data == v, (name, k)
    d2.stop()


def test_codec_states_survive_restart(daemon, tmp_path):
    extra = ["--data-dir", str(tmp_path / "data"), "--calib-tokens", "16",
             "--stats-interval", "0"]
    d = daemon(extra=extra)
    rk = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="rotatekv-2",
                            value_codec="rotatekv-2"))
    sq = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="squat-2",
                            value_codec="kivi-2"))
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((L, 32, 2 * H, D))).astype("<f2")
    info = d.admin.AddQueries(pb.AddQueriesRequest(namespace=sq.name, query_heads=2 * H,
                                                   tokens=32, queries=q.tobytes()))
    assert info.key_state_version == 1
    before = {}
    for ns in (rk, sq):
        for i in range(6):  # rk: the first block (16 tokens) calibrates version 1
            kvs.put(d.stub, ns.name, b"s%d" % i, T, ns.payload(T, seed=50 + i))
        for i in range(6):
            enc = kvs.get(d.stub, ns.name, b"s%d" % i, fmt=kvs.ENCODED).data
            raw = kvs.get(d.stub, ns.name, b"s%d" % i).data
            before[ns.name, i] = (kvs.parse_encoded(enc)[0]["k_state"], enc, raw)
    assert {before[rk.name, i][0] for i in range(6)} == {1}  # all need the permutation
    assert {before[sq.name, i][0] for i in range(6)} == {1}
    d.stop()  # flushes the host blocks: all of them reach disk

    d2 = daemon(extra=extra)
    assert "(2 codec states, 0 unreadable)" in d2.stderr_text()
    versions = {n.spec.name: n.key_state_version for n in d2.stats().namespaces}
    assert versions == {rk.name: 1, sq.name: 1}
    for (name, i), (_, enc, raw) in before.items():
        assert kvs.get(d2.stub, name, b"s%d" % i, fmt=kvs.ENCODED).data == enc, (name, i)
        assert kvs.get(d2.stub, name, b"s%d" % i).data == raw, (name, i)
    # Learning goes on from the restored state: the next version is 2.
    info = d2.admin.AddQueries(pb.AddQueriesRequest(namespace=sq.name, query_heads=2 * H,
                                                    tokens=32, queries=q.tobytes()))
    assert info.key_state_version == 2
    d2.stop()


def test_foreign_data_dir_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious.txt").write_text("not yours")
    r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r
    assert "--data-dir" in r.stderr and str(data) in r.stderr, r.stderr
    assert sorted(os.listdir(data)) == ["precious.txt"]
    assert (data / "precious.txt").read_text() == "not yours"


def test_promote_off_reads_disk_blocks_in_place(daemon, tmp_path):
    """--promote off: a RAW Get of a disk block decodes it straight from LMDB's map; the
    block stays on disk, whole blocks and layer ranges read back exactly."""
    extra = ["--data-dir", str(tmp_path / "data"), "--stats-interval", "0", "--promote", "off",
             "--gpu-capacity", "0", "--spill-queue", "2M"]
    d = daemon(host_capacity="128K", extra=extra)
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    keys = keys_of(12)
    datas = {k: ns.payload(T, seed=50 + i) for i, k in enumerate(keys)}
    for k in keys:
        kvs.put(d.stub, ns.name, k, T, datas[k])
    d.admin.Flush(pb.FlushRequest(), timeout=30)  # the writer is done with the spills
    tiers = list(d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=keys), timeout=10).tiers)
    cold = [k for k, t in zip(keys, tiers) if t == TIER_DISK]
    assert len(cold) >= 6, tiers
    lb = ns.layer_bytes()
    for k in cold:
        got = kvs.get(d.stub, ns.name, k)
        assert got.header.tier == TIER_DISK and got.data == datas[k], k
        part = kvs.get(d.stub, ns.name, k, layer_begin=1, layer_end=3)
        assert part.data == datas[k][lb:3 * lb], k
    tiers = list(d.stub.Lookup(pb.KeysRequest(namespace=ns.name, keys=cold), timeout=10).tiers)
    assert tiers == [TIER_DISK] * len(cold)

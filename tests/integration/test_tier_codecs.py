"""Precision demotion through the daemon (issue 16 item 5; README "Namespace options").

A namespace names a colder codec for the host and for the disk tier (host_codec,
disk_codec): a block that moves down, or a Put that lands straight in the host tier, has
each side re-encoded with the tier's codec where that is smaller, never larger; a promotion
keeps the colder encoding. Here, on a daemon whose small host tier spills to its disk tier:
the spilled blocks' GetHeader, encoded header, Lookup (wire, kvctl, the Python package) name
the colder codec, a Get returns data within that codec's error, the client library decodes
the encoded block with it, the namespace's stored bytes are exactly the blocks' encoded
sizes, Stats and /metrics count the re-encodes and the bytes saved, and all of it survives a
restart. Options are checked naming the field.
"""
import ctypes
import shutil
import socket
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest

import kvs

pb = kvs.pb
INVALID = grpc.StatusCode.INVALID_ARGUMENT
L, H, D, T = 4, 2, 128, 16  # 64 KiB raw blocks: fp8 ~32 KiB, kivi-2 ~12 KiB
KIVI, FP8 = 2, 1            # codec ids (gpu/codec/codec.h)
N = 48                      # blocks: about twice what the host tier holds as fp8


def gaussian(seed):
    return np.random.default_rng(seed).standard_normal((L, 2, T, H, D)).astype("<f2")


def rel_err(x, y):
    """(K, V) relative L2 errors of a decoded block against its input."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return [np.linalg.norm(y[:, kv] - x[:, kv]) / np.linalg.norm(x[:, kv]) for kv in (0, 1)]


def info_of(d, name):
    for n in d.stats().namespaces:
        if n.spec.name == name:
            return n
    raise AssertionError(f"namespace {name} not in Stats")


def tier_of(d, tier):
    return [t for t in d.stats().tiers if t.tier == tier][0]


def lookup(d, name, keys):
    return d.stub.Lookup(pb.KeysRequest(namespace=name, keys=keys))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_with_library(spec, enc):
    """libkvstash's kvs_decode_block of an encoded block with the namespace's spec (its
    tier codecs included): (raw bytes, key codec, value codec) as the result says."""
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
                        spec.fallback_codec.encode(), spec.gpu_quota_bytes,
                        spec.disk_quota_bytes, spec.host_codec.encode(), spec.disk_codec.encode())
    cap = kvs.block_bytes(spec.layers, spec.kv_heads, spec.head_dim, spec.block_tokens)
    out = ctypes.create_string_buffer(cap)
    buf = ctypes.create_string_buffer(enc, len(enc))
    res, err = pkg._lib.GetResult(), pkg._lib.Err()
    rc = f(ctypes.byref(s), buf, len(enc), out, cap, ctypes.byref(res), ctypes.byref(err))
    assert rc == 0, err.msg.decode()
    return out.raw[:res.bytes], res.key_codec.decode(), res.value_codec.decode()


def settle(d, name, keys, timeout=30):
    """Waits until the disk writer is done with the namespace: its blocks' tiers and stored
    bytes unchanged over half a second (a spill in flight still reads as a host block)."""
    prev, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = (tuple(lookup(d, name, keys).tiers), info_of(d, name).stored_bytes)
        if now == prev:
            return
        prev = now
        time.sleep(0.5)
    raise AssertionError("the disk writer did not settle")


def spill_daemon(daemon, tmp_path, extra=()):
    """A daemon whose 1 MiB host tier spills to its disk tier; Gets do not promote (so that
    what a Get reads is what the disk holds); no GPU tier, where the GPU runs set one with
    $KVSTASHD_EXTRA (a Put must land in the host tier)."""
    return daemon(host_capacity="1M",
                  extra=["--data-dir", str(tmp_path / "data"), "--disk-capacity", "64M",
                         "--promote", "off", "--gpu-capacity", "0", *extra])


def test_disk_codec_spill(daemon, tmp_path):
    """fp8 blocks, disk_codec kivi-2: the blocks the host tier spilled are kivi-2 on disk
    (Lookup, GetHeader, the encoded header, the library's decode and kvctl say so) and a Get
    returns them within kivi-2's error; those still in the host tier are fp8; the stored
    bytes are exactly the blocks' sizes; Stats and /metrics count the re-encodes; a restart
    keeps it all."""
    port = free_port()
    d = spill_daemon(daemon, tmp_path, ["--metrics-listen", f"127.0.0.1:{port}"])
    info = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="fp8", value_codec="fp8",
                       disk_codec="kivi-2")
    name, spec = info.spec.name, info.spec
    assert (spec.host_codec, spec.disk_codec) == ("", "kivi-2")
    data = {}
    for i in range(N):
        data[i] = gaussian(100 + i)
        r = kvs.put(d.stub, name, b"b%d" % i, T, data[i].tobytes())
        assert r.tier == pb.TIER_HOST and not r.fallback
    keys = [b"b%d" % i for i in range(N)]
    settle(d, name, keys)  # the writer finishes what the last Puts handed it
    lk = lookup(d, name, keys)
    assert lk.prefix_blocks == N and not lk.fallback
    assert len(lk.key_codecs) == len(lk.value_codecs) == N
    on_disk = [i for i in range(N) if lk.tiers[i] == pb.TIER_DISK]
    in_host = [i for i in range(N) if lk.tiers[i] == pb.TIER_HOST]
    assert len(on_disk) >= N // 3 and in_host, (len(on_disk), len(in_host))
    for i in on_disk:
        assert (lk.key_codecs[i], lk.value_codecs[i]) == ("kivi-2", "kivi-2")
    for i in in_host:
        assert (lk.key_codecs[i], lk.value_codecs[i]) == ("fp8", "fp8")

    stored = 0
    errs = {"disk": [], "host": []}
    for i in range(N):
        g = kvs.get(d.stub, name, keys[i])
        got = np.frombuffer(g.data, "<f2").reshape(L, 2, T, H, D)
        where = "disk" if i in on_disk else "host"
        want = ("kivi-2", "kivi-2") if where == "disk" else ("fp8", "fp8")
        assert (g.header.key_codec, g.header.value_codec) == want and not g.header.fallback
        errs[where].append(rel_err(data[i], got))
        enc = kvs.get(d.stub, name, keys[i], fmt=kvs.ENCODED)
        assert (enc.header.key_codec, enc.header.value_codec) == want
        hdr, _ = kvs.parse_encoded(enc.data)
        if where == "disk":
            assert (hdr["k_codec"], hdr["k_bits"], hdr["v_codec"], hdr["v_bits"]) == \
                (KIVI, 2, KIVI, 2)
        else:
            assert (hdr["k_codec"], hdr["v_codec"]) == (FP8, FP8)
        raw, kc, vc = decode_with_library(spec, enc.data)
        assert raw == g.data and (kc, vc) == want
        stored += len(enc.data)
    disk_err, host_err = np.mean(errs["disk"], axis=0), np.mean(errs["host"], axis=0)
    print(f"relative error (K, V): disk kivi-2 {disk_err}, host fp8 {host_err}")
    # kivi-2 on Gaussian KV (test_fidelity_bounds measures ~0.3); fp8 ~0.02.
    assert 0.15 < disk_err[0] < 0.5 and 0.2 < disk_err[1] < 0.55
    assert host_err[0] < 0.05 and host_err[1] < 0.05
    assert max(e[1] for e in errs["disk"]) < 0.6

    # Byte accounting: the namespace holds exactly the blocks' encoded bytes; the disk tier
    # counts each re-encode and what it saved (an fp8 block less its kivi-2 size).
    ns = info_of(d, name)
    assert ns.blocks == N and ns.stored_bytes == stored
    assert ns.raw_bytes == N * kvs.block_bytes(L, H, D, T)
    disk = tier_of(d, pb.TIER_DISK)
    fp8_size = len(kvs.get(d.stub, name, keys[in_host[0]], fmt=kvs.ENCODED).data)
    kivi_size = len(kvs.get(d.stub, name, keys[on_disk[0]], fmt=kvs.ENCODED).data)
    assert disk.recoded_blocks == len(on_disk)
    assert disk.recode_saved_bytes == len(on_disk) * (fp8_size - kivi_size)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'kvstash_recoded_blocks_total{{tier="disk"}} {len(on_disk)}' in text
    assert (f'kvstash_recode_saved_bytes_total{{tier="disk"}} '
            f'{len(on_disk) * (fp8_size - kivi_size)}') in text
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    r = d.kvctl("lookup", name, "b%d" % on_disk[0], "b%d" % in_host[0])
    assert r.returncode == 0, r.stderr
    assert b"disk (kivi-2/kivi-2)" in r.stdout and b"host (fp8/fp8)" in r.stdout, r.stdout
    r = d.kvctl("--json", "stats")
    assert r.returncode == 0 and b'"recoded_blocks"' in r.stdout

    # A restart: the spec keeps its tier codecs, each disk record its codecs.
    first = kvs.get(d.stub, name, keys[on_disk[0]]).data
    d.stop()
    d2 = spill_daemon(daemon, tmp_path)
    ns2 = info_of(d2, name)
    assert ns2.spec.disk_codec == "kivi-2" and ns2.spec.host_codec == ""
    lk2 = lookup(d2, name, [keys[on_disk[0]]])
    assert lk2.tiers[0] == pb.TIER_DISK
    assert (lk2.key_codecs[0], lk2.value_codecs[0]) == ("kivi-2", "kivi-2")
    assert kvs.get(d2.stub, name, keys[on_disk[0]]).data == first


def test_host_codec_put_and_only_colder(daemon, tmp_path):
    """host_codec: a Put that lands in the host tier (no GPU tier) is stored with it (the
    PutReply's size says so); a disk codec larger than a block's encoding leaves the block
    as it is (a block only gets colder)."""
    d = spill_daemon(daemon, tmp_path)
    a = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, host_codec="fp8").spec.name
    x = gaussian(7)
    r = kvs.put(d.stub, a, b"x", T, x.tobytes())
    assert r.tier == pb.TIER_HOST and r.encoded_bytes < r.raw_bytes * 0.6
    g = kvs.get(d.stub, a, b"x")
    assert (g.header.key_codec, g.header.value_codec) == ("fp8", "fp8")
    assert max(rel_err(x, np.frombuffer(g.data, "<f2").reshape(L, 2, T, H, D))) < 0.05
    lk = lookup(d, a, [b"x", b"absent"])
    assert list(lk.key_codecs) == ["fp8", ""] and list(lk.value_codecs) == ["fp8", ""]

    b = kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-2", value_codec="kivi-2",
                    host_codec="fp8", disk_codec="none").spec.name
    for i in range(N):
        kvs.put(d.stub, b, b"%d" % i, T, gaussian(i).tobytes())
    d.admin.Evict(pb.EvictRequest(namespace=b, to=pb.EvictRequest.TARGET_DISK), timeout=60)
    lk = lookup(d, b, [b"%d" % i for i in range(N)])
    assert all(t == pb.TIER_DISK for t in lk.tiers)
    assert set(lk.key_codecs) == {"kivi-2"} and set(lk.value_codecs) == {"kivi-2"}
    assert tier_of(d, pb.TIER_DISK).recoded_blocks == 0


def test_tier_codec_options(daemon):
    """host_codec and disk_codec: unknown names and the pairing with max_rel_error are
    INVALID_ARGUMENT naming the field; kvctl ns create takes --host-codec/--disk-codec; the
    Python package creates, lists and looks up with them."""
    d = daemon(extra=["--gpu-capacity", "0"])  # the Put below lands in the host tier
    kvs.expect_error(INVALID, kvs.make_ns, d.admin, L=L, H=H, D=D, T=T, host_codec="kivi-9",
                     words=("host_codec", "kivi-9"))
    kvs.expect_error(INVALID, kvs.make_ns, d.admin, L=L, H=H, D=D, T=T, disk_codec="kivi-2",
                     key_codec="kivi-4", max_rel_error=0.1,
                     words=("disk_codec", "max_rel_error"))
    name = kvs.ns_name("kvctl")
    r = d.kvctl("ns", "create", name, "--layers", L, "--kv-heads", H, "--head-dim", D,
                "--block-tokens", T, "--codec", "fp8", "--host-codec", "kivi-4",
                "--disk-codec", "kivi-2")
    assert r.returncode == 0, r.stderr
    assert b"colder tiers: host kivi-4, disk kivi-2" in r.stdout, r.stdout
    r = d.kvctl("--json", "ns", "list")
    assert r.returncode == 0 and b'"disk_codec":"kivi-2"' in r.stdout, r.stdout
    r = d.kvctl("ns", "create", kvs.ns_name("bad"), "--layers", L, "--kv-heads", H,
                "--head-dim", D, "--block-tokens", T, "--disk-codec", "nope")
    assert r.returncode != 0 and b"disk_codec" in r.stderr, r.stderr

    if kvs.SANITIZED:
        pytest.skip("the Python package cannot load into Python from a sanitizer build")
    pkg = kvs.client_package()
    with pkg.Client(d.target) as c:
        n = c.create_namespace(kvs.ns_name("py"), L, H, D, T, key_codec="none",
                               host_codec="fp8", disk_codec="kivi-2")
        assert (n.host_codec, n.disk_codec) == ("fp8", "kivi-2")
        assert [x for x in c.namespaces() if x.name == n.name][0].disk_codec == "kivi-2"
        c.put(n.name, b"k", gaussian(3))
        prefix, rows = c.lookup_codecs(n.name, [b"k", b"none"])
        assert prefix == 1 and rows == [("host", "fp8", "fp8"), ("none", "", "")]
        host = c.stats()["tiers"]["host"]
        assert "recoded_blocks" in host
        # The C struct's last field read through the ctypes mirror: a layout that drifted
        # would read something else here.
        assert host["block_meta_bytes"] == kvs.BLOCK_META
        assert host["used_bytes"] > host["blocks"] * kvs.BLOCK_META > 0

"""The data plane (issue 12, README "Data plane"): batched calls (PutMany, GetMany), the
prefix Get, and shared memory through the region socket — each byte-identical to the
plain Put/Get path, and each attacked with malformed, hostile and racing requests."""
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import pytest

import kvs
from kvs import FP16

REGION_REQ = struct.Struct("=4sIQ")          # magic, op, bytes
REGION_REP = struct.Struct("=4si16sQII200s")  # magic, code, id, bytes, pinned, 0, msg
OK, INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.NOT_FOUND,
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.fixture(scope="module")
def d(module_daemon, tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("region") / "kvstashd.region")
    dm = module_daemon(host_capacity="512M",
                       extra=("--region-socket", sock, "--region-max-bytes", "64M",
                              "--max-keys", "64"))
    dm.region_socket = sock
    return dm


@pytest.fixture
def ns(d):
    return kvs.Ns(kvs.make_ns(d.admin, L=4, H=2, D=64, T=16))


# ----------------------------------------------------------------------------- helpers


def put_many_chunks(blocks, chunk=64 << 10):
    """blocks: (ns, key, tokens, data) or (ns, key, tokens, (region, offset))."""
    for ns, key, tokens, data in blocks:
        if isinstance(data, tuple):
            yield kvs.pb.PutChunk(header=kvs.pb.PutHeader(
                namespace=ns, key=key, tokens=tokens, dtype=FP16, region=data[0],
                region_offset=data[1]))
            continue
        yield kvs.pb.PutChunk(header=kvs.pb.PutHeader(namespace=ns, key=key, tokens=tokens,
                                                      dtype=FP16))
        for pos in range(0, len(data), chunk):
            yield kvs.pb.PutChunk(data=data[pos:pos + chunk])


def put_many(d, blocks, **kw):
    return d.stub.PutMany(put_many_chunks(blocks, **kw), timeout=60).results


def get_many(d, ns, keys, messages=None, **kw):
    """GetMany; returns [(header, data)] in stream order, checking each block's chunks.
    Headers a message carries in `more` (region slots) count as headers of their own;
    messages (a list) receives the raw messages."""
    raw = list(d.stub.GetMany(kvs.pb.GetManyRequest(namespace=ns, keys=keys, **kw),
                              timeout=60))
    if messages is not None:
        messages.extend(raw)
    msgs = []
    for m in raw:
        assert not m.more or ("region" in kw and m.HasField("header")), \
            "more headers outside a region GetMany"
        msgs.append(m)
        msgs.extend(kvs.pb.GetChunk(header=h) for h in m.more)
    out, i = [], 0
    while i < len(msgs):
        assert msgs[i].HasField("header"), f"message {i}: data before a header"
        h, j = msgs[i].header, i + 1
        while j < len(msgs) and not msgs[j].HasField("header"):
            j += 1
        if h.code == 0 and "region" not in kw:
            kvs.check_get_chunks(h, msgs[i + 1:j], packed=True)
        else:
            assert j == i + 1, f"block {h.index}: data chunks after an error or a region header"
        out.append((h, b"".join(m.data for m in msgs[i + 1:j])))
        i = j
    return out


class Region:
    """A memfd shared with the daemon through its region socket."""

    def __init__(self, path, size, seal=True, register=True, allocate=True):
        self.fd = os.memfd_create("kvstash-test", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if allocate:  # the client allocates its region's memory (the daemon refuses holes)
            os.posix_fallocate(self.fd, 0, size)
        if seal:
            import fcntl
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.mem = mmap.mmap(self.fd, size)
        self.size = size
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        if register:
            code, msg, self.id, self.pinned = self.register(size)
            assert code == 0, msg

    def register(self, size, fds=None, raw=None):
        req = raw if raw is not None else REGION_REQ.pack(b"KVR1", 1, size)
        socket.send_fds(self.sock, [req], [self.fd] if fds is None else fds)
        rep = self.sock.recv(REGION_REP.size + 16)
        assert len(rep) == REGION_REP.size, f"reply of {len(rep)} bytes"
        magic, code, rid, nbytes, pinned, _, msg = REGION_REP.unpack(rep)
        assert magic == b"KVR1"
        return code, msg.rstrip(b"\0").decode(), rid, pinned

    def close(self):
        self.sock.close()
        self.mem.close()
        os.close(self.fd)


# ----------------------------------------------------------------------------- PutMany


def test_put_many_then_get_many_match_plain_calls(d, ns):
    blocks = [(ns.name, b"pm-%d" % i, 16 - i, ns.payload(16 - i, seed=i)) for i in range(6)]
    res = put_many(d, blocks, chunk=7000)
    assert [r.code for r in res] == [0] * 6
    assert all(r.encoded_bytes > 0 for r in res)
    for _, key, t, data in blocks:  # plain Get sees what PutMany stored
        assert kvs.get(d.stub, ns.name, key).data == data
    got = get_many(d, ns.name, [b[1] for b in blocks])
    assert [h.index for h, _ in got] == list(range(6))
    assert [h.tokens for h, _ in got] == [16 - i for i in range(6)]
    assert [data for _, data in got] == [b[3] for b in blocks]


def test_put_many_reports_each_block(d, ns):
    lossy = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=64, T=16, key_codec="polarquant"))
    good = lossy.payload(16, seed=1)
    bad = bytearray(good)
    bad[10:12] = b"\x00\x7e"  # fp16 NaN: a quantizing codec cannot store it
    res = put_many(d, [(lossy.name, b"ok-1", 16, good), (lossy.name, b"nan", 16, bytes(bad)),
                       (lossy.name, b"ok-2", 16, good)])
    assert [r.code for r in res] == [0, INVALID.value[0], 0]
    assert "nan" in res[1].error.lower() or "finite" in res[1].error.lower(), res[1].error
    present = list(d.stub.Exists(kvs.pb.KeysRequest(namespace=lossy.name,
                                                    keys=[b"ok-1", b"nan", b"ok-2"])).present)
    assert present == [True, False, True]


def test_put_many_empty_stream_answers_no_results(d):
    assert list(d.stub.PutMany(iter([]), timeout=10).results) == []


def test_put_many_header_before_block_complete(d, ns):
    data = ns.payload(16)

    def chunks():
        yield kvs.pb.PutChunk(header=kvs.pb.PutHeader(namespace=ns.name, key=b"a", tokens=16,
                                                      dtype=FP16))
        yield kvs.pb.PutChunk(data=data[:100])
        yield kvs.pb.PutChunk(header=kvs.pb.PutHeader(namespace=ns.name, key=b"b", tokens=16,
                                                      dtype=FP16))
    kvs.expect_error(INVALID, d.stub.PutMany, chunks(), words=("header", "block 0"))


def test_put_many_data_without_header_and_truncation(d, ns):
    data = ns.payload(16)
    blocks = list(put_many_chunks([(ns.name, b"x", 16, data)]))
    kvs.expect_error(INVALID, d.stub.PutMany, iter(blocks + [kvs.pb.PutChunk(data=b"zz")]),
                     words=("data", "header"))
    kvs.expect_error(INVALID, d.stub.PutMany, iter(blocks[:-1]), words=("truncated",))
    kvs.expect_error(INVALID, d.stub.PutMany, iter([kvs.pb.PutChunk(data=b"zz")]),
                     words=("header",))


def test_put_many_block_limit(d, ns):
    data = ns.payload(1)
    blocks = [(ns.name, b"k%d" % i, 1, data) for i in range(65)]  # --max-keys 64
    kvs.expect_error(INVALID, put_many, d, blocks, words=("max-keys",))


def test_put_many_unknown_namespace_fails_the_call(d, ns):
    kvs.expect_error(NOT_FOUND, put_many, d, [(ns.name, b"a", 1, ns.payload(1)),
                                              ("no-such-ns", b"b", 1, ns.payload(1))])


def test_put_many_cancelled_midway_leaves_daemon_healthy(d, ns):
    data = ns.payload(16)
    stop = threading.Event()

    def chunks():
        for i in range(40):
            yield from put_many_chunks([(ns.name, b"c%d" % i, 16, data)])
        stop.wait(5)
    fut = d.stub.PutMany.future(chunks(), timeout=30)
    fut.cancel()
    stop.set()
    assert kvs.put(d.stub, ns.name, b"after", 16, data).raw_bytes == len(data)


# ----------------------------------------------------------------------------- GetMany


def test_get_many_absent_keys_are_answered_in_place(d, ns):
    data = [ns.payload(16, seed=i) for i in range(3)]
    put_many(d, [(ns.name, b"g%d" % i, 16, data[i]) for i in range(3)])
    got = get_many(d, ns.name, [b"g0", b"missing", b"g2", b"g1"])
    assert [(h.index, h.code) for h, _ in got] == [(0, 0), (1, NOT_FOUND.value[0]), (2, 0), (3, 0)]
    assert got[1][0].error and got[1][1] == b""
    assert [got[0][1], got[2][1], got[3][1]] == [data[0], data[2], data[1]]


def test_prefix_get_stops_at_first_absent(d, ns):
    data = [ns.payload(16, seed=10 + i) for i in range(5)]
    put_many(d, [(ns.name, b"p%d" % i, 16, data[i]) for i in (0, 1, 2, 4)])
    got = get_many(d, ns.name, [b"p%d" % i for i in range(5)], prefix=True)
    assert [h.index for h, _ in got] == [0, 1, 2]
    assert [x for _, x in got] == data[:3]
    assert get_many(d, ns.name, [b"p3", b"p4"], prefix=True) == []


def test_get_many_layer_range_and_encoded(d, ns):
    data = ns.payload(16, seed=7)
    put_many(d, [(ns.name, b"lr", 16, data)])
    lb = ns.layer_bytes(16)
    (h, raw), = get_many(d, ns.name, [b"lr"], layer_begin=1, layer_end=3)
    assert (h.layer_begin, h.layer_end) == (1, 3) and raw == data[lb:3 * lb]
    (h, enc), = get_many(d, ns.name, [b"lr"], format=kvs.ENCODED)
    assert enc == kvs.get(d.stub, ns.name, b"lr", fmt=kvs.ENCODED).data


def test_get_many_validation_names_the_field(d, ns):
    kvs.expect_error(INVALID, get_many, d, ns.name, [], words=("keys",))
    kvs.expect_error(INVALID, get_many, d, ns.name, [b"k"] * 65, words=("keys",))
    kvs.expect_error(INVALID, get_many, d, ns.name, [b""], words=("keys[0]",))
    kvs.expect_error(INVALID, get_many, d, ns.name, [b"k"], layer_begin=3, layer_end=2,
                     words=("layer_begin",))
    kvs.expect_error(NOT_FOUND, get_many, d, "nope", [b"k"])
    kvs.expect_error(INVALID, get_many, d, ns.name, [b"k"], region_offsets=[0],
                     words=("region_offsets",))


def test_get_many_many_large_blocks_in_order(d):
    big = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))  # 2 MiB blocks
    data = [big.payload(16, seed=100 + i) for i in range(12)]
    res = put_many(d, [(big.name, b"b%d" % i, 16, data[i]) for i in range(12)], chunk=1 << 20)
    assert all(r.code == 0 for r in res)
    got = get_many(d, big.name, [b"b%d" % i for i in reversed(range(12))])
    assert [x for _, x in got] == list(reversed(data))


def test_get_many_client_gone_midway(d):
    big = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    data = big.payload(16)
    put_many(d, [(big.name, b"c%d" % i, 16, data) for i in range(8)])
    for _ in range(5):
        it = d.stub.GetMany(kvs.pb.GetManyRequest(namespace=big.name,
                                                  keys=[b"c%d" % i for i in range(8)]),
                            timeout=30)
        next(it)
        it.cancel()
    assert get_many(d, big.name, [b"c0"])[0][1] == data


# ----------------------------------------------------------------------------- shared memory


def test_data_plane_names_the_region_socket(d):
    r = d.stub.DataPlane(kvs.pb.DataPlaneRequest())
    assert r.region_socket == d.region_socket
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert r.boot_id == f.read().strip()
    assert r.max_region_bytes == 64 << 20


def test_region_put_and_get_byte_identical(d, ns):
    n = 4
    bb = ns.bytes(16)
    reg = Region(d.region_socket, 2 * n * bb)
    try:
        data = [ns.payload(16, seed=200 + i) for i in range(n)]
        for i in range(n):
            reg.mem[i * bb:(i + 1) * bb] = data[i]
        res = put_many(d, [(ns.name, b"r%d" % i, 16, (reg.id, i * bb)) for i in range(n)])
        assert [r.code for r in res] == [0] * n
        for i in range(n):  # stored from shared memory, read back over gRPC
            assert kvs.get(d.stub, ns.name, b"r%d" % i).data == data[i]
        base = n * bb
        got = get_many(d, ns.name, [b"r%d" % i for i in range(n)], region=reg.id,
                       region_offsets=[base + i * bb for i in range(n)], region_slot_bytes=bb)
        assert [(h.index, h.code, h.total_bytes) for h, _ in got] == [(i, 0, bb) for i in range(n)]
        for i in range(n):
            assert reg.mem[base + i * bb:base + (i + 1) * bb] == data[i]
        # A plain Put names shared memory too.
        reg.mem[0:bb] = data[3]
        r = d.stub.Put(iter([kvs.pb.PutChunk(header=kvs.pb.PutHeader(
            namespace=ns.name, key=b"single", tokens=16, dtype=FP16, region=reg.id,
            region_offset=0))]))
        assert r.raw_bytes == bb
        assert kvs.get(d.stub, ns.name, b"single").data == data[3]
    finally:
        reg.close()


def test_region_encoded_get_and_small_slots(d):
    lossy = kvs.Ns(kvs.make_ns(d.admin, L=2, H=2, D=64, T=16, key_codec="polarquant",
                               value_codec="kivi-2"))
    data = lossy.payload(16, seed=5)
    put_many(d, [(lossy.name, b"e", 16, data)])
    enc = kvs.get(d.stub, lossy.name, b"e", fmt=kvs.ENCODED).data
    reg = Region(d.region_socket, 1 << 20)
    try:
        (h, _), = get_many(d, lossy.name, [b"e"], format=kvs.ENCODED, region=reg.id,
                           region_offsets=[4096], region_slot_bytes=len(enc))
        assert h.code == 0 and h.total_bytes == len(enc)
        assert reg.mem[4096:4096 + len(enc)] == enc
        (h, _), = get_many(d, lossy.name, [b"e"], format=kvs.ENCODED, region=reg.id,
                           region_offsets=[0], region_slot_bytes=len(enc) - 1)
        assert h.code == EXHAUSTED.value[0] and "region_slot_bytes" in h.error
        (h, _), = get_many(d, lossy.name, [b"e"], region=reg.id, region_offsets=[0],
                           region_slot_bytes=len(data) - 2)
        assert h.code == EXHAUSTED.value[0] and "region_slot_bytes" in h.error
    finally:
        reg.close()


def test_region_encoded_get_many_of_large_blocks(d):
    # Encoded blocks over 256 KiB are copied into their slots on the daemon's pool (smaller
    # ones on the calling thread), so they finish in any order: every slot must hold its
    # block's stored bytes, sealed, and only headers come back (get_many checks that no
    # data chunk follows a region header).
    mixed = kvs.Ns(kvs.make_ns(d.admin, L=8, H=8, D=128, T=16, key_codec="polarquant",
                               value_codec="none"))
    n = 12
    keys = [b"L%d" % i for i in range(n)]
    put_many(d, [(mixed.name, k, 16 if i % 3 else 2, mixed.payload(16 if i % 3 else 2, seed=i))
                 for i, k in enumerate(keys)])
    enc = [kvs.get(d.stub, mixed.name, k, fmt=kvs.ENCODED).data for k in keys]
    assert max(len(e) for e in enc) > 256 << 10 > min(len(e) for e in enc)
    slot = max(len(e) for e in enc)
    reg = Region(d.region_socket, n * slot)
    try:
        got = get_many(d, mixed.name, keys, format=kvs.ENCODED, region=reg.id,
                       region_offsets=[i * slot for i in range(n)], region_slot_bytes=slot)
        assert [(h.index, h.code, h.format, h.total_bytes) for h, _ in got] == \
            [(i, 0, kvs.ENCODED, len(enc[i])) for i in range(n)]
        for i in range(n):
            b = bytes(reg.mem[i * slot:i * slot + len(enc[i])])
            kvs.parse_encoded(b)
            assert b == enc[i], i
    finally:
        reg.close()


def test_region_offsets_outside_are_refused(d, ns):
    bb = ns.bytes(16)
    reg = Region(d.region_socket, 2 * bb)
    try:
        put_many(d, [(ns.name, b"o", 16, ns.payload(16))])
        for off in (bb + 1, 2 * bb, 2**64 - 1, 2**63):
            kvs.expect_error(INVALID, put_many, d, [(ns.name, b"x", 16, (reg.id, off))],
                             words=("region", "outside"))
            kvs.expect_error(INVALID, get_many, d, ns.name, [b"o", b"o"], region=reg.id,
                             region_offsets=[0, off], region_slot_bytes=bb,
                             words=("region_offsets[1]",))
        kvs.expect_error(INVALID, get_many, d, ns.name, [b"o"], region=reg.id,
                         region_offsets=[0], region_slot_bytes=2**64 - 1,
                         words=("region_offsets[0]",))
        kvs.expect_error(INVALID, get_many, d, ns.name, [b"o", b"o"], region=reg.id,
                         region_offsets=[0], region_slot_bytes=bb, words=("region_offsets",))
        kvs.expect_error(INVALID, put_many, d, [(ns.name, b"x", 16, (b"short", 0))],
                         words=("region",))
        kvs.expect_error(NOT_FOUND, put_many, d, [(ns.name, b"x", 16, (b"\0" * 16, 0))],
                         words=("region",))
        # data chunks after a header that names shared memory
        chunks = list(put_many_chunks([(ns.name, b"x", 16, (reg.id, 0))]))
        kvs.expect_error(INVALID, d.stub.PutMany, iter(chunks + [kvs.pb.PutChunk(data=b"z")]),
                         words=("data", "header"))
    finally:
        reg.close()


def test_region_dies_with_its_connection(d, ns):
    bb = ns.bytes(16)
    reg = Region(d.region_socket, bb)
    reg.mem[:] = ns.payload(16)
    rid = reg.id
    assert put_many(d, [(ns.name, b"live", 16, (rid, 0))])[0].code == 0
    reg.close()
    # the daemon sees the close on its loop: retry briefly
    for _ in range(100):
        e = kvs.rpc_error(put_many, d, [(ns.name, b"dead", 16, (rid, 0))])
        if e.code() == NOT_FOUND:
            break
        time.sleep(0.02)
    assert e.code() == NOT_FOUND and "region" in e.details()


def test_region_registration_is_checked(d):
    import fcntl
    reg = Region(d.region_socket, 1 << 20, seal=False, register=False)
    try:
        code, msg, _, _ = reg.register(1 << 20)  # unsealed: could shrink under the daemon
        assert code != 0 and "F_SEAL_SHRINK" in msg
        fcntl.fcntl(reg.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        code, msg, _, _ = reg.register((1 << 20) + 1)  # more than the file holds
        assert code != 0 and "bytes" in msg
        code, msg, _, _ = reg.register(0)
        assert code != 0 and "bytes" in msg
        code, msg, _, _ = reg.register(65 << 20)  # over --region-max-bytes
        assert code != 0 and "region-max-bytes" in msg
        code, msg, _, _ = reg.register(1 << 20, fds=[])
        assert code != 0 and "descriptor" in msg
        code, msg, _, _ = reg.register(1 << 20, fds=[reg.fd, reg.fd])
        assert code != 0 and "descriptor" in msg
        code, msg, _, _ = reg.register(1 << 20, raw=b"garbage!")
        assert code != 0 and "request" in msg
        code, msg, _, _ = reg.register(1 << 20, raw=REGION_REQ.pack(b"KVR1", 9, 1 << 20))
        assert code != 0 and "op" in msg
        with open("/proc/self/exe", "rb") as f:  # a regular file: no seals at all
            code, msg, _, _ = reg.register(4096, fds=[f.fileno()])
        assert code != 0 and "memfd" in msg
        code, msg, rid, _ = reg.register(1 << 20)  # and then a good one on the same socket
        assert code == 0 and len(rid) == 16
        with pytest.raises(PermissionError):  # the seal holds: the region cannot shrink
            os.ftruncate(reg.fd, 4096)
    finally:
        reg.close()
    # total bytes come back when connections close: 64M can be registered again
    big = Region(d.region_socket, 60 << 20)
    big.close()
    again = Region(d.region_socket, 60 << 20)
    again.close()


def _rss_shmem_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def test_sparse_region_is_refused(daemon, tmp_path):
    """A region's memory is the client's to allocate. The daemon maps a region with its
    pages populated (MAP_POPULATE), so a sparse memfd (ftruncate only) made the daemon
    allocate it: a 2 GiB registration took its RSS from 19 MB to 2 GB and held its loop
    thread 3.4 s, and --region-max-bytes is 64G by default. A region with a hole in the
    registered range is refused naming the fix; allocated (posix_fallocate), it registers
    and the daemon allocates nothing."""
    import fcntl
    sock = str(tmp_path / "kvs.region")
    dm = daemon(extra=["--region-socket", sock])
    size = 256 << 20
    base = _rss_shmem_kib(dm.proc.pid)
    reg = Region(sock, size, register=False, allocate=False)
    try:
        code, msg, _, _ = reg.register(size)  # sparse: nothing allocated
        assert code != 0 and "allocate" in msg, msg
        assert _rss_shmem_kib(dm.proc.pid) - base < 16 << 10, "the daemon allocated it"
        os.posix_fallocate(reg.fd, 0, size // 2)  # a hole in the second half
        code, msg, _, _ = reg.register(size)
        assert code != 0 and "allocate" in msg, msg
        code, msg, rid, _ = reg.register(size // 2)  # the allocated half alone: fine
        assert code == 0, msg
        os.posix_fallocate(reg.fd, 0, size)
        code, msg, rid, _ = reg.register(size)
        assert code == 0 and len(rid) == 16, msg
    finally:
        reg.close()


class PageRegions:
    """Raw connections to one region socket (self.sock), each able to register the one
    allocated page of a memfd sealed against shrinking (what the socket maps). close()
    closes the connections left in self.conns and the memfd."""

    def __init__(self, sock):
        self.sock, self.conns = sock, []
        self.fd = os.memfd_create("kvstash-test", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, 4096)
        os.posix_fallocate(self.fd, 0, 4096)
        import fcntl
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(self.sock)
        self.conns.append(s)
        return s

    def register(self, s):
        """Registers the page over connection s: (code, message)."""
        socket.send_fds(s, [REGION_REQ.pack(b"KVR1", 1, 4096)], [self.fd])
        rep = s.recv(REGION_REP.size + 16)
        _, code, _, _, _, _, msg = REGION_REP.unpack(rep)
        return code, msg.rstrip(b"\0").decode()

    def close(self):
        for s in self.conns:
            s.close()
        os.close(self.fd)


def test_region_count_is_bounded(daemon, tmp_path):
    """Each region is a mapping in the daemon (and, with a GPU engine, a pinned range or an
    opened IPC handle), and each socket connection an open descriptor: a local client that
    registers page-sized regions over many connections must not exhaust the daemon's
    mappings (vm.max_map_count) or descriptors. By default at most 1024 regions of all
    clients (the 1025th registration is refused naming --region-max-count) and as many
    connections at once (the next is closed at once); both come back when a connection
    closes."""
    sock = str(tmp_path / "kvs.region")
    # One process plays every client here: its own share (--region-max-per-client,
    # test_region_share_of_one_client) is the whole.
    dm = daemon(extra=["--region-socket", sock, "--region-max-per-client", 1024])
    pr = PageRegions(sock)
    register, connect, conns = pr.register, pr.connect, pr.conns

    try:
        ok = 0
        for _ in range(17):  # 64 regions a connection at most: 17 * 64 = 1088
            s = connect()
            for _ in range(64):
                code, msg = register(s)
                if code:
                    break
                ok += 1
            if code:
                break
        assert ok == 1024 and "--region-max-count" in msg, (ok, msg)
        assert dm.stats().data_plane.regions == 1024
        conns.pop(0).close()  # its 64 regions go...
        kvs.wait_for(lambda: dm.stats().data_plane.regions == 960, what="regions released")
        assert register(conns[-1]) == (0, "")  # ...and the room with them
        for s in conns:
            s.close()
        conns.clear()
        kvs.wait_for(lambda: dm.stats().data_plane.regions == 0, what="every region released")
        assert register(connect()) == (0, "")  # room again
        conns.pop().close()

        # Connections, with a smaller bound (a test process may have 1024 descriptors): up
        # to --region-max-count at once; the next one is closed by the daemon at once.
        sock = str(tmp_path / "kvs2.region")
        dm = daemon(extra=["--region-socket", sock, "--region-max-count", 16,
                           "--region-max-per-client", 16])
        pr.sock = sock
        for _ in range(16):
            connect()
        extra = connect()
        extra.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError, struct.error)):
            register(extra)  # EOF (an empty reply) or a reset: never an answer
        assert register(conns[0]) == (0, "")  # the connections it kept still work
        conns.pop(0).close()
        kvs.wait_for(lambda: dm.stats().data_plane.regions == 0, what="regions released")
        assert register(connect()) == (0, "")  # a place again
    finally:
        pr.close()


def test_region_share_of_one_client(daemon, tmp_path):
    """One client process could take every region and connection place of the region socket
    (--region-max-count) and leave none to the others. Each process now holds at most
    --region-max-per-client of each: past it a registration is refused naming the flag and a
    connection is closed at once, while another process still gets its places."""
    sock = str(tmp_path / "kvs.region")
    dm = daemon(extra=["--region-socket", sock, "--region-max-count", 16,
                       "--region-max-per-client", 4])
    pr = PageRegions(sock)
    register, connect, conns = pr.register, pr.connect, pr.conns

    try:
        first = connect()
        for _ in range(4):
            assert register(first) == (0, "")
        code, msg = register(first)  # a fifth region of this process
        assert code and "--region-max-per-client" in msg, (code, msg)
        for _ in range(3):
            connect()
        extra = connect()  # a fifth connection of this process: closed at once
        extra.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError, struct.error)):
            register(extra)
        # Another process has its own share: it connects and registers.
        child = """
import os, socket, struct, sys
REQ, REP = struct.Struct(sys.argv[2]), struct.Struct(sys.argv[3])
fd = int(sys.argv[4])
ok = 0
for _ in range(4):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    socket.send_fds(s, [REQ.pack(b"KVR1", 1, 4096)], [fd])
    ok += REP.unpack(s.recv(REP.size + 16))[1] == 0
print(ok)
"""
        r = subprocess.run([sys.executable, "-c", child, sock, REGION_REQ.format,
                            REGION_REP.format, str(pr.fd)], pass_fds=[pr.fd],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "4", (r.stdout, r.stderr)
        kvs.wait_for(lambda: dm.stats().data_plane.regions == 4,  # the child's went with it
                     what="the child's regions released")
        # This process's places come back with its connections.
        first.close()
        conns.remove(first)
        kvs.wait_for(lambda: dm.stats().data_plane.regions == 0, what="regions released")
        assert register(conns[0]) == (0, "")
    finally:
        pr.close()


def test_region_socket_out_of_descriptors_does_not_spin(tmp_path):
    """A daemon out of descriptors cannot accept a region-socket connection: accept fails
    and the connection stays queued. Polled again at once, that was a busy loop on the loop
    thread (a core at 100% for as long as a local client kept the descriptors taken). The
    listener now pauses and retries; once descriptors are free again it accepts."""
    sock = str(tmp_path / "k.sock")
    err = open(tmp_path / "stderr", "wb")
    proc = kvs.spawn(["sh", "-c", 'ulimit -n 40 && exec "$@"', "sh", kvs.KVSTASHD,
                      "--listen", "unix:" + sock, "--host-capacity", "64M", "--gpu", "off"],
                     stdout=err, stderr=err)
    conns = []
    try:
        kvs.wait_for(lambda: os.path.exists(sock + ".region") or proc.poll() is not None,
                     what="the region socket")
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        for _ in range(60):  # past the daemon's 40 descriptors; they wait in the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sock + ".region")
            conns.append(s)
        time.sleep(0.5)

        def cpu_s():
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        c0, t0 = cpu_s(), time.monotonic()
        time.sleep(2)
        used = cpu_s() - c0
        assert used < 0.25 * (time.monotonic() - t0), f"{used:.2f} s of CPU in 2 s: spinning"
        assert "not accepting for" in (tmp_path / "stderr").read_text()  # and it says why
        for s in conns:
            s.close()
        conns.clear()
        # Descriptors free again: a new connection is accepted and served.
        fd = os.memfd_create("kvstash-test", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        os.posix_fallocate(fd, 0, 4096)
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)

        def registered():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            try:
                s.connect(sock + ".region")
                socket.send_fds(s, [REGION_REQ.pack(b"KVR1", 1, 4096)], [fd])
                rep = s.recv(REGION_REP.size + 16)
                return len(rep) == REGION_REP.size and REGION_REP.unpack(rep)[1] == 0
            except OSError:
                return False
            finally:
                s.close()
        kvs.wait_for(registered, timeout=10, what="a registration after the descriptors freed")
        os.close(fd)
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        proc.wait(30)
        err.close()


def test_region_headers_share_messages(d):
    # Into region slots only headers are streamed: those of blocks that are ready at once go
    # in one message (GetChunk.more), in key order, errors in place; a prefix GetMany still
    # stops at the first absent key.
    ns = kvs.Ns(kvs.make_ns(d.admin, L=2, H=1, D=64, T=16))
    bb, n = ns.bytes(16), 48
    blocks = [ns.payload(16, seed=i) for i in range(n)]
    put_many(d, [(ns.name, b"h%d" % i, 16, blocks[i]) for i in range(n) if i != 40])
    reg = Region(d.region_socket, n * bb)
    try:
        keys = [b"h%d" % i for i in range(n)]
        msgs = []
        got = get_many(d, ns.name, keys, messages=msgs, region=reg.id,
                       region_offsets=[i * bb for i in range(n)], region_slot_bytes=bb)
        assert [h.index for h, _ in got] == list(range(n))
        assert [h.code for h, _ in got] == [0] * 40 + [NOT_FOUND.value[0]] + [0] * 7
        assert len(msgs) < n, f"{len(msgs)} messages for {n} headers: none shared"
        for i in range(n):
            if i != 40:
                assert bytes(reg.mem[i * bb:(i + 1) * bb]) == blocks[i], f"block {i}"
        got = get_many(d, ns.name, keys, prefix=True, region=reg.id,
                       region_offsets=[i * bb for i in range(n)], region_slot_bytes=bb)
        assert [h.index for h, _ in got] == list(range(40))
    finally:
        reg.close()


REGION_CUDA_REQ = struct.Struct("=4sIQQ64s16s")  # magic, op, bytes, offset, handle, uuid


def test_cuda_region_requests_are_checked(d):
    # A CUDA IPC region (op 2) names GPU memory by its handle and carries no descriptor. A
    # daemon without a GPU engine refuses it as unsupported, naming the engine; one with an
    # engine refuses this made-up device UUID, naming the field. Malformed requests first.
    reg = Region(d.region_socket, 4096)
    try:
        req = REGION_CUDA_REQ.pack(b"KVR1", 2, 1 << 20, 0, b"\x01" * 64, b"\x02" * 16)
        code, msg, _, _ = reg.register(0, raw=req)  # with the memfd attached
        assert code == -30001 and "descriptor" in msg, (code, msg)
        code, msg, _, _ = reg.register(0, raw=req[:-1], fds=[])
        assert code == -30001 and "request" in msg and "CUDA" in msg, (code, msg)
        code, msg, _, _ = reg.register(0, raw=req, fds=[])
        assert (code == -30012 and "GPU engine" in msg) or (code == -30001 and "uuid" in msg), \
            (code, msg)
        code, msg, rid, _ = reg.register(4096)  # the connection still serves
        assert code == 0 and len(rid) == 16
    finally:
        reg.close()


def test_region_socket_hostile_clients(d):
    # connect and vanish, send nothing, send a huge datagram: the daemon keeps serving
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(d.region_socket)
        s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(d.region_socket)
    s.send(b"x" * 60000)
    rep = s.recv(REGION_REP.size)
    assert REGION_REP.unpack(rep)[1] != 0
    s.close()
    reg = Region(d.region_socket, 4096)
    reg.close()
    assert d.stub.DataPlane(kvs.pb.DataPlaneRequest()).region_socket == d.region_socket


@pytest.mark.parametrize("fmt", [kvs.RAW, kvs.ENCODED])
def test_region_get_races_disconnect(d, fmt):
    """A client that closes its region while GetMany writes into it (decoded blocks, or
    stored ones copied on the daemon's pool): the daemon keeps the mapping until the call
    is done (no crash), and later calls are refused."""
    big = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    bb = big.bytes(16)
    slot = bb + 65536  # an encoded block of codec none is the raw bytes and its table
    put_many(d, [(big.name, b"z%d" % i, 16, big.payload(16, seed=i)) for i in range(8)])
    for _ in range(3):
        reg = Region(d.region_socket, 8 * slot)
        it = d.stub.GetMany(kvs.pb.GetManyRequest(
            namespace=big.name, keys=[b"z%d" % i for i in range(8)], region=reg.id, format=fmt,
            region_offsets=[i * slot for i in range(8)], region_slot_bytes=slot), timeout=30)
        reg.close()
        try:
            list(it)
        except grpc.RpcError as e:
            assert e.code() == NOT_FOUND
    assert get_many(d, big.name, [b"z0"])[0][0].code == 0


def test_region_encoded_slots_that_overlap(d):
    """Hostile or careless: every block of an ENCODED GetMany names the same slot, so the
    daemon's pool copies race into one place. The client's own memory gets whichever bytes;
    the daemon answers every block and stays healthy."""
    big = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    bb = big.bytes(16)
    keys = [b"o%d" % i for i in range(16)]
    put_many(d, [(big.name, k, 16, big.payload(16, seed=i)) for i, k in enumerate(keys)])
    reg = Region(d.region_socket, bb + 65536)
    try:
        got = get_many(d, big.name, keys, format=kvs.ENCODED, region=reg.id,
                       region_offsets=[0] * len(keys), region_slot_bytes=bb + 65536)
        assert [(h.index, h.code) for h, _ in got] == [(i, 0) for i in range(len(keys))]
    finally:
        reg.close()
    assert get_many(d, big.name, keys[:1], format=kvs.ENCODED)[0][0].code == 0


# ----------------------------------------------------------------------------- libkvstash


BENCH_RESTORE = os.environ.get("KVS_BENCH_RESTORE",
                               os.path.join(os.path.dirname(kvs.KVCTL), "kvs-bench-restore"))


@pytest.mark.parametrize("codec", ["none", "kivi-2"])
def test_libkvstash_paths_return_the_same_bytes(tmp_path, codec):
    """libkvstash's PutMany (bytes and shared memory), Get, GetMany, GetMany into shared
    memory, GetMany encoded + client decode, and encoded into shared memory (shmenc), through
    kvs-bench-restore on a small prefix:
    it exits 1 when a path returns other bytes than the first (or, for `none`, than were
    put). The daemon listens on a Unix socket, so the region socket is on by default."""
    import subprocess
    sock = str(tmp_path / "kvs.sock")
    err = open(tmp_path / "stderr", "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "unix:" + sock, "--host-capacity", "256M",
                      *kvs.KVSTASHD_EXTRA], stdout=err, stderr=err)
    try:
        for _ in range(200):
            if os.path.exists(sock + ".region"):
                break
            time.sleep(0.05)
        r = subprocess.run([BENCH_RESTORE, "--target", "unix:" + sock, "--codec", codec,
                            "--tokens", "64", "--layers", "4", "--heads", "2", "--dim", "64",
                            "--reps", "1", "--paths", "get,getmany,shm,encoded,shmenc,gpudecode,"
                            "shmgpu,shmgpu-pipe,ipc"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        for path in ("PutMany (shm", "| get |", "| getmany |", "| shm |", "| encoded |",
                     "| shmenc |"):
            assert path in r.stdout, r.stdout
    finally:
        proc.terminate()
        proc.wait(30)
        err.close()


def test_stats_tell_shared_memory_from_wire_bytes(d, ns):
    bb = ns.bytes(16)

    def dp():
        return d.admin.Stats(kvs.pb.StatsRequest()).data_plane
    before = dp()
    reg = Region(d.region_socket, 2 * bb)
    try:
        during = dp()
        assert during.regions == before.regions + 1
        assert during.region_bytes == before.region_bytes + 2 * bb
        reg.mem[0:bb] = ns.payload(16, seed=3)
        put_many(d, [(ns.name, b"s1", 16, (reg.id, 0)), (ns.name, b"s2", 16, ns.payload(16))])
        get_many(d, ns.name, [b"s1"], region=reg.id, region_offsets=[bb], region_slot_bytes=bb)
        get_many(d, ns.name, [b"s2"])
        after = dp()
        assert after.put_region_bytes - before.put_region_bytes == bb
        assert after.put_wire_bytes - before.put_wire_bytes == bb
        assert after.get_region_bytes - before.get_region_bytes == bb
        assert after.get_wire_bytes - before.get_wire_bytes == bb
    finally:
        reg.close()


# ----------------------------------------------------------------------------- paged layouts


def vllm_layout(L, nb, bs, H, D, hnd=False):
    """vLLM: one tensor [2][nb][bs][H][D] per layer, layers one after the other (hnd: the
    FlashInfer order [2][nb][H][bs][D], whose heads of a token are not one run)."""
    R = H * D * 2
    per_layer = 2 * nb * bs * R
    lay = kvs.pb.PagedLayout(page_tokens=bs, k_base=[l * per_layer for l in range(L)],
                             v_base=[l * per_layer + nb * bs * R for l in range(L)],
                             page_stride=bs * R, token_stride=D * 2 if hnd else R,
                             head_stride=bs * D * 2 if hnd else D * 2)
    return lay, L * per_layer


def sglang_layout(L, np_, ps, H, D):
    """SGLang page-first host pool [np][L][2][ps][H][D]."""
    R = H * D * 2
    lay = kvs.pb.PagedLayout(page_tokens=ps, k_base=[2 * l * ps * R for l in range(L)],
                             v_base=[(2 * l + 1) * ps * R for l in range(L)],
                             page_stride=L * 2 * ps * R, token_stride=R, head_stride=D * 2)
    return lay, np_ * L * 2 * ps * R


def ref_gather(mem, lay, pages, t, L, H, D):
    """Reference gather with numpy, element by element index arithmetic: [L][2][t][H][D]."""
    import numpy as np
    a = np.frombuffer(mem, dtype="<u2")
    out = np.empty((L, 2, t, H, D), dtype="<u2")
    for l in range(L):
        for kv, base in ((0, lay.k_base[l]), (1, lay.v_base[l])):
            for i in range(t):
                p = pages[i // lay.page_tokens]
                off = base + p * lay.page_stride + (i % lay.page_tokens) * lay.token_stride
                for h in range(H):
                    o = (off + h * lay.head_stride) // 2
                    out[l, kv, i, h] = a[o:o + D]
    return out.tobytes()


@pytest.mark.parametrize("t", [16, 5])
def test_paged_put_and_get_match_a_reference_gather(d, t):
    import numpy as np
    L, H, D, T = 3, 2, 32, 16
    nsx = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    vl, vbytes = vllm_layout(L, 8, T, H, D)
    sl, sbytes = sglang_layout(L, 6, T, H, D)
    src = Region(d.region_socket, vbytes)
    dst = Region(d.region_socket, sbytes)
    try:
        rng = np.random.default_rng(t)
        src.mem[:] = rng.integers(0, 0x7800, vbytes // 2, dtype="<u2").tobytes()  # finite fp16
        pages = [[5], [2], [7]]
        blocks = [(nsx.name, b"pg%d" % i, t, None) for i in range(3)]
        hdrs = []
        for i, (name, key, tok, _) in enumerate(blocks):
            hdrs.append(kvs.pb.PutChunk(header=kvs.pb.PutHeader(
                namespace=name, key=key, tokens=tok, dtype=FP16, region=src.id,
                layout=vl if i == 0 else None, pages=pages[i])))  # later headers reuse it
        res = d.stub.PutMany(iter(hdrs)).results
        assert [r.code for r in res] == [0, 0, 0], res
        want = [ref_gather(src.mem, vl, pages[i], t, L, H, D) for i in range(3)]
        for i in range(3):  # stored = the reference gather of the engine's pages
            assert kvs.get(d.stub, nsx.name, b"pg%d" % i).data == want[i]
        # Back into SGLang's page-first pool at other pages: exactly those bytes change.
        out_pages = [4, 0, 3]
        got = get_many(d, nsx.name, [b"pg%d" % i for i in range(3)], region=dst.id,
                       layout=sl, pages=out_pages)
        assert [(h.index, h.code) for h, _ in got] == [(0, 0), (1, 0), (2, 0)]
        for i in range(3):
            assert ref_gather(dst.mem, sl, [out_pages[i]], t, L, H, D) == want[i]
        untouched = bytearray(dst.mem[:])
        for p in out_pages:  # zero the written rows: what is left must be all zero
            for l in range(L):
                for base in (sl.k_base[l], sl.v_base[l]):
                    off = base + p * sl.page_stride
                    untouched[off:off + t * sl.token_stride] = bytes(t * sl.token_stride)
        assert not any(untouched)
        # A layer range lands in those layers only.
        dst.mem[:] = bytes(sbytes)
        get_many(d, nsx.name, [b"pg0"], region=dst.id, layout=sl, pages=[1], layer_begin=1,
                 layer_end=2)
        part = ref_gather(dst.mem, sl, [1], t, L, H, D)
        lb = 2 * t * H * D * 2
        assert part[lb:2 * lb] == want[0][lb:2 * lb] and not any(part[:lb] + part[2 * lb:])
    finally:
        src.close()
        dst.close()


def test_paged_puts_take_the_receive_budget_and_give_it_back(daemon, tmp_path):
    """A paged PutMany's block is gathered into a buffer counted in --recv-budget, like one
    that arrives on the stream: a block larger than the budget is RESOURCE_EXHAUSTED naming
    it, before any gather; blocks within it are stored, and once the call ends the budget
    is whole again (Stats' streams.recv_used_bytes 0): 24 blocks through a budget of 4, in
    six calls of 4 (each needs the whole budget, so each fails unless the calls before it
    gave theirs back; within one call, a GPU engine's encodes are asynchronous, so a 5th
    block could find the budget held by the call's own first four)."""
    import numpy as np
    sock = str(tmp_path / "kvs.region")
    L, H, D, T, BIG, N = 4, 8, 128, 16, 20, 24        # 256 KiB blocks; 1.25 MiB ones
    dd = daemon(extra=["--region-socket", sock, "--recv-budget", "1M", "--stats-interval", 0])
    small = kvs.Ns(kvs.make_ns(dd.admin, L=L, H=H, D=D, T=T))
    big = kvs.Ns(kvs.make_ns(dd.admin, L=BIG, H=H, D=D, T=T))
    vl, vbytes = vllm_layout(BIG, N, T, H, D)
    src = Region(sock, vbytes)
    try:
        src.mem[:] = np.random.default_rng(5).integers(0, 0x7800, vbytes // 2, "<u2").tobytes()
        small_vl = kvs.pb.PagedLayout()
        small_vl.CopyFrom(vl)
        del small_vl.k_base[L:]
        del small_vl.v_base[L:]

        def puts(ns, lay, first, n):
            return dd.stub.PutMany(iter([kvs.pb.PutChunk(header=kvs.pb.PutHeader(
                namespace=ns.name, key=b"b%d" % i, tokens=T, dtype=FP16, region=src.id,
                layout=lay if i == first else None, pages=[i]))
                for i in range(first, first + n)]), timeout=60).results
        kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, puts, big, vl, 0, 1,
                         words=("--recv-budget",))
        for first in range(0, N, 4):
            assert [r.code for r in puts(small, small_vl, first, 4)] == [0] * 4, first
        for i in (0, N - 1):
            assert kvs.get(dd.stub, small.name, b"b%d" % i).data == \
                ref_gather(src.mem, small_vl, [i], T, L, H, D)
        kvs.wait_for(lambda: dd.stats().streams.recv_used_bytes == 0, what="budget back")
    finally:
        src.close()


def test_a_put_many_waits_for_the_budget_its_own_blocks_hold(daemon):
    """A PutMany whose next block finds --recv-budget held by the call's own earlier blocks
    (still being encoded: asynchronous on the pool and on a GPU engine) waits for them to
    give it back instead of failing the whole call with RESOURCE_EXHAUSTED; the client's
    sends back up meanwhile (backpressure). 16 blocks of 2 MiB, rotatekv-2 (slow on a CPU),
    through a budget of 2 blocks: every block stored, the budget whole again after. Another
    call that finds the budget held by others still fails at once (test_limits)."""
    L, H, D, T, N = 32, 8, 128, 16, 16
    dd = daemon(extra=["--recv-budget", "4M", "--stats-interval", 0])
    ns = kvs.Ns(kvs.make_ns(dd.admin, L=L, H=H, D=D, T=T, key_codec="rotatekv-2",
                            value_codec="rotatekv-2"))
    blocks = [(ns.name, b"w%d" % i, T, ns.payload(T, seed=i)) for i in range(N)]
    res = put_many(dd, blocks, chunk=1 << 20)
    assert [r.code for r in res] == [0] * N, [r.error for r in res]
    for i in (0, N - 1):
        assert len(kvs.get(dd.stub, ns.name, b"w%d" % i).data) == len(blocks[i][3])
    kvs.wait_for(lambda: dd.stats().streams.recv_used_bytes == 0, what="budget back")


def test_paged_requests_are_checked(d):
    L, H, D, T = 2, 2, 32, 16
    nsx = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    vl, vbytes = vllm_layout(L, 4, T, H, D)
    reg = Region(d.region_socket, vbytes)
    try:
        def put(layout, pages, region=reg.id, tokens=T):
            return d.stub.PutMany(iter([kvs.pb.PutChunk(header=kvs.pb.PutHeader(
                namespace=nsx.name, key=b"x", tokens=tokens, dtype=FP16, region=region,
                layout=layout, pages=pages))])).results
        kvs.expect_error(INVALID, put, vl, [4], words=("pages[0]",))          # past the pool
        kvs.expect_error(INVALID, put, vl, [2**32 - 1], words=("pages[0]",))
        kvs.expect_error(INVALID, put, vl, [0, 1], words=("pages",))          # 2 for 1 page
        kvs.expect_error(INVALID, put, None, [0], words=("layout",))          # no layout yet
        bad = kvs.pb.PagedLayout(); bad.CopyFrom(vl); del bad.k_base[-1]
        kvs.expect_error(INVALID, put, bad, [0], words=("k_base",))
        huge = kvs.pb.PagedLayout(); huge.CopyFrom(vl); huge.page_stride = 2**63
        kvs.expect_error(INVALID, put, huge, [1], words=("page",))
        wrap = kvs.pb.PagedLayout(); wrap.CopyFrom(vl); wrap.k_base[0] = 2**64 - 64
        kvs.expect_error(INVALID, put, wrap, [0], words=("k_base",))
        kvs.expect_error(INVALID, put, vl, [0], region=b"", words=("region",))
        assert [r.code for r in put(vl, [3])] == [0]
        kvs.expect_error(INVALID, get_many, d, nsx.name, [b"x"], region=reg.id, layout=vl,
                         pages=[9], words=("pages[0]",))
        kvs.expect_error(INVALID, get_many, d, nsx.name, [b"x"], region=reg.id, layout=vl,
                         pages=[0, 1], words=("pages",))
        kvs.expect_error(INVALID, get_many, d, nsx.name, [b"x"], region=reg.id, layout=vl,
                         pages=[0], format=kvs.ENCODED, words=("RAW",))
        kvs.expect_error(INVALID, get_many, d, nsx.name, [b"x"], layout=vl, pages=[0],
                         words=("region",))
    finally:
        reg.close()


def test_small_blocks_pack_whole_layers(d):
    """A 1-token block of a Llama-3-8B-shaped namespace is 32 layers of 8 KiB: GetMany (and
    Get with pack_layers) send it in one data message instead of 32; a plain Get keeps one
    layer per chunk, as the v1 contract says."""
    big = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=16))
    data = big.payload(1, seed=9)
    kvs.put(d.stub, big.name, b"t1", 1, data)
    msgs = list(d.stub.GetMany(kvs.pb.GetManyRequest(namespace=big.name, keys=[b"t1"])))
    assert len(msgs) == 2 and msgs[1].data == data and msgs[1].layer == 0
    msgs = list(d.stub.Get(kvs.pb.GetRequest(namespace=big.name, key=b"t1", pack_layers=True)))
    assert len(msgs) == 2 and msgs[1].data == data
    msgs = list(d.stub.Get(kvs.pb.GetRequest(namespace=big.name, key=b"t1")))
    assert len(msgs) == 33 and b"".join(m.data for m in msgs[1:]) == data
    # A layer range packs too, starting at its first layer.
    msgs = list(d.stub.Get(kvs.pb.GetRequest(namespace=big.name, key=b"t1", layer_begin=3,
                                             layer_end=7, pack_layers=True)))
    lb = len(data) // 32
    assert len(msgs) == 2 and msgs[1].layer == 3 and msgs[1].data == data[3 * lb:7 * lb]

"""Stalled and hostile streams (issue 10, fault 3). Before: 200 Put streams that sent a
header and stopped reserved 63 MiB of a 64 MiB host tier, evicting another namespace's
committed blocks; 48 streams holding all but one byte of an 8 MiB block took the RSS from
30 MB to 359 MB and kept 288 MB after they were cancelled.

Now a Put holds a stream slot (--max-puts, --max-puts-per-conn) and, from its first data
chunk, a buffer counted in --recv-budget; the block's room in a tier is reserved only once
its payload is complete; a stream without progress for --stream-idle is cancelled."""
import threading
import time

import grpc
import pytest

import kvs
from kvs import pb


class StalledPut:
    """A Put stream that sends a header and `data` bytes, then waits until released
    (it then ends the stream, or the server cancelled it already)."""

    def __init__(self, stub, ns, key, tokens, data=b"", chunk=1 << 20):
        self.release = threading.Event()
        self.sent = threading.Event()
        self.error = None
        self.reply = None

        def gen():
            yield pb.PutChunk(header=pb.PutHeader(namespace=ns, key=key, tokens=tokens,
                                                  dtype=kvs.FP16))
            for i in range(0, len(data), chunk):
                yield pb.PutChunk(data=data[i:i + chunk])
            self.sent.set()
            self.release.wait(60)

        def run():
            try:
                self.reply = stub.Put(gen(), timeout=60)
            except grpc.RpcError as e:
                self.error = e
            self.sent.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self, timeout=30):
        self.release.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def stream_stats(d):
    return d.stats().streams


def test_header_only_streams_evict_nobody(daemon):
    d = daemon(host_capacity="64M", extra=["--stream-idle", 3, "--stats-interval", 0])
    a = kvs.Ns(kvs.make_ns(d.admin, L=8, H=8, D=128, T=16))  # 512 KiB blocks
    blocks = {b"a%d" % i: a.payload(seed=i) for i in range(80)}  # 40 MiB committed
    for k, v in blocks.items():
        kvs.put(d.stub, a.name, k, a.T, v)
    used = d.host_tier().used_bytes
    b = kvs.Ns(kvs.make_ns(d.admin, L=8, H=8, D=128, T=16))
    channels = [d.stubs() for _ in range(4)]  # 50 streams per connection
    stalled = [StalledPut(channels[i % 4][1], b.name, b"s%d" % i, b.T) for i in range(200)]
    kvs.wait_for(lambda: stream_stats(d).puts_open == 200, what="200 open Put streams")
    # Nothing was reserved for them: the committed blocks are all there, the tier as used.
    assert d.host_tier().used_bytes == used
    r = d.stub.Lookup(pb.KeysRequest(namespace=a.name, keys=list(blocks)))
    assert r.prefix_blocks == len(blocks)
    # Another client's Put goes through meanwhile.
    kvs.put(d.stub, a.name, b"late", a.T, a.payload(seed=999))
    # The stalled streams are cut after --stream-idle, and their slots come back.
    kvs.wait_for(lambda: stream_stats(d).puts_open == 0, timeout=30, what="idle cancellation")
    for s in stalled:
        s.finish()
        assert s.error is not None and s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, \
            s.error
        assert "--stream-idle" in s.error.details()
    st = stream_stats(d)
    assert st.idle_cancelled >= 200 and st.recv_used_bytes == 0
    for k, v in blocks.items():
        assert kvs.get(d.stub, a.name, k).data == v
    for ch, _, _ in channels:
        ch.close()


def test_nearly_complete_streams_are_bounded_and_returned(daemon):
    d = daemon(host_capacity="64M", extra=["--stream-idle", 3, "--stats-interval", 0,
                                           "--recv-budget", "24M"])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=64))  # 8 MiB blocks
    assert ns.bytes() == 8 << 20
    data = ns.payload()
    rss0, pinned0 = kvs.rss_bytes(d.proc.pid), kvs.pinned_bytes(d)
    channels = [d.stubs() for _ in range(4)]
    puts = [StalledPut(channels[i % 4][1], ns.name, b"n%d" % i, ns.T, data[:-1])
            for i in range(48)]
    for p in puts:
        assert p.sent.wait(30)
    kvs.wait_for(lambda: stream_stats(d).recv_used_bytes == 24 << 20 and
             stream_stats(d).recv_refused == 45, what="3 buffers held, 45 refused")
    refused = [p for p in puts if p.error is not None]
    assert len(refused) == 45
    for p in refused:
        assert p.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--recv-budget" in p.error.details()
    # 3 x 8 MiB held; gRPC's own buffers and the refused messages on top. Before the fix
    # this was 359 MB (every stream got its 8 MiB buffer).
    # With a GPU engine the held buffers are in the pinned pool, committed in 64 MiB slabs
    # (storage/hostpool.h): counted apart, they are a fixed slab, not a buffer per stream.
    rss = kvs.rss_bytes(d.proc.pid) - (kvs.pinned_bytes(d) - pinned0)
    if not kvs.SANITIZED:  # a sanitizer's allocator keeps freed memory (quarantine)
        assert rss - rss0 < 120 << 20, f"RSS grew by {(rss - rss0) >> 20} MiB"
    kvs.wait_for(lambda: stream_stats(d).puts_open == 0, timeout=30, what="idle cancellation")
    st = stream_stats(d)
    assert st.recv_used_bytes == 0 and st.idle_cancelled >= 3
    for p in puts:
        p.finish()
    # The budget is whole again: a complete Put of the same size goes through.
    kvs.put(d.stub, ns.name, b"whole", ns.T, data)
    assert kvs.get(d.stub, ns.name, b"whole").data == data
    for ch, _, _ in channels:
        ch.close()


def test_put_stream_caps(daemon):
    d = daemon(extra=["--max-puts", 6, "--max-puts-per-conn", 4, "--stream-idle", 30,
                      "--stats-interval", 0])
    ns = kvs.Ns(kvs.make_ns(d.admin))
    # Channels with their own subchannel pool: two TCP connections, not one shared.
    own = [("grpc.use_local_subchannel_pool", 1)]
    ch1, stub1, _ = d.stubs(options=own)
    ch2, stub2, _ = d.stubs(options=own)
    held = [StalledPut(stub1, ns.name, b"c1-%d" % i, ns.T) for i in range(4)]
    kvs.wait_for(lambda: stream_stats(d).puts_open == 4, what="4 streams on one connection")
    e = kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, stub1, ns.name, b"x",
                         ns.T, ns.payload(), words=["--max-puts-per-conn"])
    # Another connection still gets slots, up to the total.
    held += [StalledPut(stub2, ns.name, b"c2-%d" % i, ns.T) for i in range(2)]
    kvs.wait_for(lambda: stream_stats(d).puts_open == 6, what="6 streams")
    kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.put, stub2, ns.name, b"y",
                     ns.T, ns.payload(), words=["--max-puts"])
    assert stream_stats(d).puts_refused == 2
    for h in held:
        h.finish()
    kvs.wait_for(lambda: stream_stats(d).puts_open == 0, what="slots given back")
    kvs.put(stub1, ns.name, b"after", ns.T, ns.payload())
    ch1.close()
    ch2.close()
    del e


# A client that stops reading must stall the server's sends: no read-ahead, and a receive
# window that does not grow. BDP probing grows the window with the measured bandwidth: on
# the GPU machine (grpcio from pip, newer than Debian's) test_get_streams_are_bounded saw
# its Gets end instead of stalling, most likely because the window took the whole 8 MiB.
NO_READ_AHEAD = [("grpc.http2.lookahead_bytes", 0), ("grpc.http2.bdp_probe", 0)]


def test_trickled_put_is_cut_and_a_slow_one_is_not(daemon):
    """Slowloris: a Put that sends its payload a byte at a time keeps a stream slot, a
    receive buffer and the block's budget for as long as it likes if every message counts
    as progress (1-byte messages every 0.3 s against --stream-idle 2 ran until the test gave
    up). Progress is now a header, 64 KiB of payload, or the block complete, so the trickle
    is cut after --stream-idle; a slow but real client (64 KiB a second) is not."""
    d = daemon(extra=["--stream-idle", 2, "--stats-interval", 0])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=4, H=8, D=128, T=32))  # 512 KiB blocks
    data = ns.payload()
    done = threading.Event()

    def trickle():
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns.name, key=b"slowloris",
                                              tokens=ns.T, dtype=kvs.FP16))
        for i in range(len(data)):
            if done.wait(0.3):
                return
            yield pb.PutChunk(data=data[i:i + 1])

    try:
        with pytest.raises(grpc.RpcError) as ei:
            d.stub.Put(trickle(), timeout=30)
        assert ei.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.CANCELLED), ei.value
        assert "--stream-idle" in (ei.value.details() or "")
    finally:
        done.set()
    assert stream_stats(d).idle_cancelled >= 1

    def slow():
        yield pb.PutChunk(header=pb.PutHeader(namespace=ns.name, key=b"slow", tokens=ns.T,
                                              dtype=kvs.FP16))
        for i in range(0, len(data), 64 << 10):
            time.sleep(1)
            yield pb.PutChunk(data=data[i:i + (64 << 10)])

    r = d.stub.Put(slow(), timeout=60)  # 8 s for 512 KiB, never idle for 2 s
    assert r.tier in (pb.TIER_HOST, pb.TIER_GPU)
    assert kvs.get(d.stub, ns.name, b"slow").data == data


@pytest.mark.parametrize("shape", [
    dict(L=32, H=8, D=128, T=64),  # 8 MiB: its data messages wait for the client
    dict(L=1, H=8, D=128, T=128),  # one layer of 512 KiB: one data message, sent with the
])                                 # status in the stream's last batch
def test_stalled_get_is_cancelled(daemon, shape):
    """A Get whose client stops reading holds a reader reference and its decode buffer:
    it is cut after --stream-idle like a stalled Put, whether it waits in a data message
    or in the last one, which carries the status."""
    d = daemon(extra=["--stream-idle", 2, "--stats-interval", 0])
    ns = kvs.Ns(kvs.make_ns(d.admin, **shape))
    kvs.put(d.stub, ns.name, b"big", ns.T, ns.payload())
    ch, stub, _ = d.stubs(options=NO_READ_AHEAD)
    it = stub.Get(pb.GetRequest(namespace=ns.name, key=b"big"), timeout=60)
    first = next(it)  # the header; then read nothing more
    assert first.HasField("header")
    kvs.wait_for(lambda: stream_stats(d).idle_cancelled >= 1, timeout=30, what="Get cancelled")
    with pytest.raises(grpc.RpcError) as ei:
        for _ in it:
            pass
    assert ei.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    ch.close()
    # The block is whole and free to be evicted or deleted again.
    assert kvs.get(d.stub, ns.name, b"big").data == ns.payload()
    r = d.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=[b"big"]))
    assert r.deleted == 1


def test_get_streams_are_bounded(daemon):
    """Each Get holds read-ahead buffers while its client keeps the stream open: a client
    that opens Gets and never reads them is refused a slot past --max-gets-per-conn on its
    connection and past --max-gets in total (RESOURCE_EXHAUSTED naming the flag), and the
    slots come back when the streams end."""
    d = daemon(extra=["--max-gets", 3, "--max-gets-per-conn", 2, "--stats-interval", 0])
    ns = kvs.Ns(kvs.make_ns(d.admin, L=32, H=8, D=128, T=64))  # 8 MiB: a stream stalls
    kvs.put(d.stub, ns.name, b"big", ns.T, ns.payload())
    own = [("grpc.use_local_subchannel_pool", 1), *NO_READ_AHEAD]
    ch1, stub1, _ = d.stubs(options=own)
    ch2, stub2, _ = d.stubs(options=own)
    held = []

    def hold(stub):
        it = stub.GetMany(pb.GetManyRequest(namespace=ns.name, keys=[b"big"]), timeout=60)
        assert next(it).HasField("header")  # open, then read nothing more
        held.append(it)

    try:
        hold(stub1)
        hold(stub1)
        kvs.wait_for(lambda: stream_stats(d).gets_open == 2, what="2 Get streams open")
        kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.get, stub1, ns.name, b"big",
                         words=["--max-gets-per-conn"])
        hold(stub2)  # another connection still gets one, up to the total
        kvs.wait_for(lambda: stream_stats(d).gets_open == 3, what="3 Get streams open")
        kvs.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, kvs.get, stub2, ns.name, b"big",
                         words=["--max-gets)"])
        assert stream_stats(d).gets_refused == 2
    finally:
        for it in held:
            it.cancel()
    kvs.wait_for(lambda: stream_stats(d).gets_open == 0, what="Get slots given back")
    assert kvs.get(stub1, ns.name, b"big").data == ns.payload()
    ch1.close()
    ch2.close()

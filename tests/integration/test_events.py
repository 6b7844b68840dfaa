"""KV events for cache-aware routers (issue 15 item 2, README "KV events",
daemon/events.h): kvstashd --events-listen publishes block stored/removed events in vLLM's
format (ZMQ PUB, multipart [topic, seq, payload], payload a msgpack EventBatch), which
llm-d's KV cache manager consumes. A python3-zmq subscriber decodes them with
python3-msgpack and checks every message against the documented schema: Put (stored),
Get (nothing), Delete (removed), eviction from the last tier under a small
--host-capacity, moves to and from the disk tier, a namespace drop (AllBlocksCleared),
topics per namespace, consecutive sequence numbers, a skipped number where a full queue
dropped events (counted in Stats and /metrics), and a subscriber that never reads, which
slows no Put and costs the other subscribers nothing.
"""
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

# Debian's python3-zmq and python3-msgpack (the README installs them); the GPU machine's
# Python has neither, and its run of the whole suite skips this file rather than stop.
msgpack = pytest.importorskip("msgpack")
zmq = pytest.importorskip("zmq")

import kvs
from kvs import pb

TOPIC = "kv@test-node"
MEDIUM = {pb.TIER_GPU: "GPU", pb.TIER_HOST: "CPU", pb.TIER_DISK: "DISK"}


# ----------------------------------------------------------------------------- subscriber


def check_event(ev):
    """One event against the schema (events.h); returns (tag, hashes, medium)."""
    assert isinstance(ev, list) and ev and isinstance(ev[0], str), ev
    tag = ev[0]
    if tag == "BlockStored":
        # [tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
        #  lora_name]: vLLM's field order
        assert len(ev) == 8, ev
        _, hashes, parent, tokens, block_size, lora_id, medium, lora_name = ev
        assert len(hashes) == 1 and isinstance(hashes[0], bytes), ev
        assert parent is None and tokens == [] and lora_id is None and lora_name is None, ev
        assert isinstance(block_size, int) and block_size > 0, ev
        assert medium in ("GPU", "CPU", "DISK"), ev
        return tag, hashes, medium
    if tag == "BlockRemoved":
        assert len(ev) == 3, ev
        _, hashes, medium = ev
        assert hashes and all(isinstance(h, bytes) and 1 <= len(h) <= 64 for h in hashes), ev
        assert medium in ("GPU", "CPU", "DISK"), ev
        return tag, hashes, medium
    assert ev == ["AllBlocksCleared"], ev
    return tag, [], None


class Sub:
    """A SUB socket on the daemon's endpoint. Every message is checked as it arrives:
    three frames, the topic, an 8-byte big-endian sequence number following the previous
    one (gaps are recorded), and the payload's schema."""

    def __init__(self, endpoint, topic_filter="", hwm=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        if hwm is not None:  # messages queued on our side (0: no limit)
            self.sock.setsockopt(zmq.RCVHWM, hwm)
        if hwm == 1:  # a stuck subscriber: little room in the kernel either
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, topic_filter)
        self.sock.connect(endpoint)
        self.last_seq = None
        self.gaps = []
        self.received = 0  # store events (a removal of n keys counts n)

    def recv(self, timeout=3.0):
        """(namespace, seq, batch) of the next message, or None after timeout s."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 3, frames
        topic, seq_b, payload = frames
        topic = topic.decode()
        assert topic.startswith(TOPIC + "@"), topic
        assert len(seq_b) == 8
        seq = int.from_bytes(seq_b, "big")
        if self.last_seq is not None:
            assert seq > self.last_seq, (seq, self.last_seq)
            if seq != self.last_seq + 1:
                self.gaps.append((self.last_seq, seq))
        self.last_seq = seq
        batch = msgpack.unpackb(payload, raw=False)
        assert isinstance(batch, list) and len(batch) == 3, batch
        ts, events, dp_rank = batch
        assert isinstance(ts, float) and abs(ts - time.time()) < 60, ts
        assert dp_rank == 0
        assert isinstance(events, list) and events
        for ev in events:
            tag, hashes, _ = check_event(ev)
            self.received += max(len(hashes), 1) if tag != "BlockStored" else 1
        return topic[len(TOPIC) + 1:], seq, events

    def events(self, timeout=1.0, ns=None):
        """Every event that arrives until none comes for `timeout` s (of ns, if given)."""
        out = []
        while (m := self.recv(timeout)) is not None:
            if ns is None or m[0] == ns:
                out.extend(m[2])
        return out

    def close(self):
        self.sock.close()
        self.ctx.term()


def sync(d, sub):
    """Returns once sub receives: ZMQ delivers nothing until its subscription has reached
    the publisher, so Puts into a probe namespace go until one's event arrives."""
    probe = kvs.Ns(kvs.make_ns(d.admin, name=kvs.ns_name("probe")))
    data = probe.payload()
    for i in range(200):
        kvs.put(d.stub, probe.name, b"probe-%d" % i, probe.T, data)
        if sub.recv(0.1) is not None:
            break
    else:
        raise AssertionError("the subscriber never received an event")
    sub.events(timeout=0.5)  # the other probes
    # From here on, every event published reaches sub (it reads them all): the two counts
    # move together unless events are dropped.
    sub.base = (d.stats().events.published, sub.received)


def all_delivered(d, sub):
    """Every event published since sync reached sub."""
    return d.stats().events.published - sub.base[0] == sub.received - sub.base[1]


def start(daemon, tmp_path, *extra, host_capacity="256M"):
    endpoint = f"ipc://{tmp_path}/events.sock"
    d = daemon(host_capacity=host_capacity,
               extra=["--events-listen", endpoint, "--events-topic", TOPIC, *extra])
    return d, endpoint


@pytest.fixture
def dsub(daemon, tmp_path):
    d, endpoint = start(daemon, tmp_path)
    sub = Sub(endpoint)
    sync(d, sub)
    yield d, sub
    sub.close()


def replay(events, state=None):
    """Applies events to a set of (key, medium), as a router holding entries per tier
    does, checking each is consistent with what came before (removed from where it was);
    returns {key: medium}, checking that no key is in two media once the events are
    applied (a move is stored-then-removed: two media for a moment only)."""
    state = set() if state is None else state
    for ev in events:
        tag, hashes, medium = check_event(ev)
        for h in hashes:
            if tag == "BlockStored":
                state.add((h, medium))  # a replace in the same tier: already there
            else:
                assert (h, medium) in state, (ev, sorted(m for k, m in state if k == h))
                state.remove((h, medium))
        if tag == "AllBlocksCleared":
            state.clear()
    out = dict(state)
    assert len(out) == len(state), f"keys in two media: {sorted(state)}"
    return out


def lookup(d, ns, keys):
    lk = d.stub.Lookup(pb.KeysRequest(namespace=ns, keys=keys), timeout=10)
    return {k: MEDIUM[t] for k, t in zip(keys, lk.tiers) if t != pb.TIER_NONE}


def stored(key, medium="CPU", T=4):
    return ["BlockStored", [key], None, [], T, None, medium, None]


# ----------------------------------------------------------------------------- tests


def test_put_get_delete(dsub):
    d, sub = dsub
    ns = kvs.Ns(kvs.make_ns(d.admin))
    k16 = bytes.fromhex("4e7b4f6b8cadfb2a1b1a20c2457494c4")  # a chained key (README)
    k8 = (0x1122334455667788).to_bytes(8, "big")  # a vLLM-style 64-bit hash
    for k in (k16, k8):
        assert kvs.put(d.stub, ns.name, k, ns.T, ns.payload()).tier == pb.TIER_HOST
    assert sub.events(ns=ns.name) == [stored(k16), stored(k8)]

    # Reads change nothing: no event.
    assert kvs.get(d.stub, ns.name, k16).data == ns.payload()
    assert lookup(d, ns.name, [k16, k8, b"absent"]) == {k16: "CPU", k8: "CPU"}
    d.stub.Exists(pb.KeysRequest(namespace=ns.name, keys=[k16]), timeout=10)
    assert sub.recv(0.5) is None

    # A replace in the same tier: the block is still there, a store says so.
    kvs.put(d.stub, ns.name, k8, 2, ns.payload(2))
    assert sub.events(ns=ns.name) == [stored(k8)]

    # Delete: one removal for the keys that existed.
    r = d.stub.Delete(pb.KeysRequest(namespace=ns.name, keys=[k16, k8, b"absent"]), timeout=10)
    assert r.deleted == 2
    assert sub.events(ns=ns.name) == [["BlockRemoved", [k16, k8], "CPU"]]
    assert sub.gaps == []

    s = d.stats().events
    assert s.endpoint.startswith("ipc://") and s.endpoint.endswith("/events.sock")
    assert s.dropped == 0 and s.send_errors == 0 and s.queued == 0
    assert all_delivered(d, sub)


def test_eviction_from_the_last_tier(daemon, tmp_path):
    """Without a disk tier the host tier is the last: a block evicted for room is removed."""
    d, endpoint = start(daemon, tmp_path, host_capacity="8K")
    sub = Sub(endpoint)
    try:
        sync(d, sub)
        ns = kvs.Ns(kvs.make_ns(d.admin))  # ~600-byte blocks: about a dozen fit
        keys = [b"blk-%02d" % i for i in range(40)]
        for k in keys:
            kvs.put(d.stub, ns.name, k, ns.T, ns.payload())
        evs = sub.events(ns=ns.name)
        removed = [h for e in evs if e[0] == "BlockRemoved" for h in e[1]]
        assert len(removed) >= 20 and set(removed) < set(keys)
        assert all(check_event(e)[2] == "CPU" for e in evs)
        # Replaying the events gives exactly what Lookup says is there.
        state = replay(evs)
        assert state == lookup(d, ns.name, keys)
        assert d.host_tier().evictions >= len(removed)
        assert sub.gaps == []
    finally:
        sub.close()


def test_tier_moves_with_a_disk_tier(daemon, tmp_path):
    """With --data-dir, a host victim moves: stored on DISK, then removed from CPU (never
    absent in between); a Get promotes it back; an evict out of the store removes it from
    the tier it is in."""
    # A spill queue that holds every victim: none is dropped because the writer is behind.
    d, endpoint = start(daemon, tmp_path, "--data-dir", str(tmp_path / "data"),
                        "--spill-queue", "1M", host_capacity="8K")
    sub = Sub(endpoint)
    try:
        sync(d, sub)
        ns = kvs.Ns(kvs.make_ns(d.admin))
        keys = [b"disk-%02d" % i for i in range(30)]
        for k in keys:
            kvs.put(d.stub, ns.name, k, ns.T, ns.payload())
        state, seen = set(), []

        def settled():
            """The events so far, replayed, say what Lookup says (the disk writer
            commits in the background)."""
            evs = sub.events(0.2, ns=ns.name)
            seen.extend(evs)
            return replay(evs, state) == lookup(d, ns.name, keys)

        kvs.wait_for(settled, "events replayed = Lookup", timeout=30)
        on_disk = [k for k, m in state if m == "DISK"]
        assert len(on_disk) >= 10
        # Each move: the store on disk comes first, the removal from the host tier next.
        k = on_disk[0]
        at = seen.index(stored(k, "DISK"))
        assert seen[at + 1][0] == "BlockRemoved" and k in seen[at + 1][1], seen[at:at + 2]
        assert seen[at + 1][2] == "CPU"
        # A Get of a disk block moves it up.
        assert kvs.get(d.stub, ns.name, k).data == ns.payload()
        kvs.wait_for(settled, "events after a promotion", timeout=30)
        assert (k, "CPU") in state and (k, "DISK") not in state
        # Out of the store: every block leaves from where it is.
        d.admin.Evict(pb.EvictRequest(namespace=ns.name, to=pb.EvictRequest.TARGET_OUT),
                      timeout=60)
        kvs.wait_for(lambda: replay(sub.events(0.2, ns=ns.name), state) == {},
                     "every block removed", timeout=30)
        assert lookup(d, ns.name, keys) == {}
        assert sub.gaps == []
    finally:
        sub.close()


def test_namespace_drop_clears(dsub):
    d, sub = dsub
    a = kvs.Ns(kvs.make_ns(d.admin))
    b = kvs.Ns(kvs.make_ns(d.admin))
    for i in range(5):
        kvs.put(d.stub, a.name, b"a-%d" % i, a.T, a.payload())
    kvs.put(d.stub, b.name, b"b-0", b.T, b.payload())
    sub.events()
    r = d.admin.DropNamespace(pb.NameRequest(name=a.name), timeout=10)
    assert r.blocks_dropped == 5
    # One message on a's topic, no removal per block; b keeps its block.
    m = sub.recv()
    assert m[0] == a.name and m[2] == [["AllBlocksCleared"]]
    assert sub.recv(0.5) is None
    assert lookup(d, b.name, [b"b-0"]) == {b"b-0": "CPU"}


def test_topics_filter_by_namespace(daemon, tmp_path):
    d, endpoint = start(daemon, tmp_path)
    a = kvs.Ns(kvs.make_ns(d.admin))
    b = kvs.Ns(kvs.make_ns(d.admin))
    only_a = Sub(endpoint, topic_filter=f"{TOPIC}@{a.name}")
    try:
        # Synchronise on a's own topic, then Put into both.
        for i in range(200):
            kvs.put(d.stub, a.name, b"sync-%d" % i, a.T, a.payload())
            if only_a.recv(0.1):
                break
        only_a.events(0.5)
        kvs.put(d.stub, b.name, b"kb", b.T, b.payload())
        kvs.put(d.stub, a.name, b"ka", a.T, a.payload())
        got = []
        while (m := only_a.recv(1.0)) is not None:
            got.append(m)
        assert [(ns, evs) for ns, _, evs in got] == [(a.name, [stored(b"ka")])]
    finally:
        only_a.close()


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("kvstash_events_")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_full_queue_drops_are_counted_and_leave_a_gap(daemon, tmp_path):
    """--events-queue 1: a burst of Puts overflows the publisher's queue; the Puts are not
    held up, the drops are counted (Stats, /metrics), and the subscriber sees a sequence
    number skipped where events were lost."""
    mport = free_port()
    d, endpoint = start(daemon, tmp_path, "--events-queue", "1", "--metrics-listen",
                        f"127.0.0.1:{mport}")
    sub = Sub(endpoint)
    try:
        sync(d, sub)
        ns = kvs.Ns(kvs.make_ns(d.admin, name=kvs.ns_name("burst")))
        r = d.kvctl("bench", ns.name, "--blocks", "256", "--threads", "4", "--keep")
        assert r.returncode == 0, r.stderr
        kvs.wait_for(lambda: d.stats().events.dropped > 0, "events dropped")
        kvs.put(d.stub, ns.name, b"after", ns.T, ns.payload())  # a message after the gap
        kvs.wait_for(lambda: (sub.events(0.3), sub.gaps)[1], "a gap in seq", timeout=20)
        s = d.stats().events
        assert s.dropped > 0 and s.send_errors == 0
        assert all_delivered(d, sub)  # what was not dropped arrived
        m = scrape(mport)
        assert m["kvstash_events_dropped_total"] == s.dropped
        assert m["kvstash_events_published_total"] == s.published
        assert d.health().status == pb.HealthReply.SERVING
    finally:
        sub.close()


def put_many(d, blocks):
    """PutMany of (namespace, key, tokens, data) blocks; every one must be stored."""
    def chunks():
        for ns, key, tokens, data in blocks:
            yield pb.PutChunk(header=pb.PutHeader(namespace=ns, key=key, tokens=tokens,
                                                  dtype=kvs.FP16))
            yield pb.PutChunk(data=data)
    res = d.stub.PutMany(chunks(), timeout=60).results
    assert len(res) == len(blocks) and all(r.code == 0 for r in res), res[:3]


def test_subscriber_that_never_reads(daemon, tmp_path):
    """A subscriber that never reads does not slow Puts, and a second subscriber still gets
    every event: past the stuck one's high-water mark ZMQ drops messages for it alone,
    which it sees as gaps in seq. Blocks alternate between two namespaces, so that each
    event is a message of its own and the stuck subscriber's buffers overflow."""
    d, endpoint = start(daemon, tmp_path)
    reader = Sub(endpoint, hwm=0)  # 0: no limit on the reading side, it never loses
    stuck = Sub(endpoint, hwm=1)   # one message queued, a 4 KiB socket buffer
    try:
        sync(d, reader)
        a = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=1))
        b = kvs.Ns(kvs.make_ns(d.admin, L=1, H=1, D=16, T=1))
        data = a.payload()
        n, per_call = 12000, 400
        keys = [b"k-%05d" % i for i in range(n)]
        got = {a.name: [], b.name: []}
        stop = threading.Event()

        def read():
            while not stop.is_set():
                m = reader.recv(0.2)
                if m and m[0] in got:
                    got[m[0]].extend(m[2])

        t = threading.Thread(target=read)
        t.start()
        t0 = time.monotonic()
        for c in range(0, n, per_call):
            put_many(d, [((a, b)[i % 2].name, keys[i], 1, data)
                         for i in range(c, c + per_call)])
        took = time.monotonic() - t0
        kvs.wait_for(lambda: len(got[a.name]) + len(got[b.name]) >= n,
                     f"{n} events at the reading subscriber", timeout=60)
        stop.set()
        t.join()
        for i, ns in enumerate((a, b)):
            assert sorted(got[ns.name]) == sorted(stored(k, T=1) for k in keys[i::2])
        assert reader.gaps == []
        assert all_delivered(d, reader)
        s = d.stats().events
        assert s.dropped == 0 and s.send_errors == 0
        assert d.health().status == pb.HealthReply.SERVING
        # The stuck subscriber, read at last, lost messages of its own: it got the first
        # ones (its buffers' worth), and the next message after those shows the gap.
        stuck_msgs = 0
        while stuck.recv(1.0) is not None:
            stuck_msgs += 1
        assert 0 < stuck_msgs < n and stuck.gaps == []
        kvs.put(d.stub, a.name, b"after", 1, data)
        m = stuck.recv(5.0)
        assert m is not None and m[2] == [stored(b"after", T=1)]
        assert len(stuck.gaps) == 1 and stuck.gaps[0][1] > stuck.gaps[0][0] + 1
        # Not a benchmark: a bound only Puts that waited on the stuck subscriber would miss.
        assert took < 60, f"{n} Puts took {took:.1f} s"
        print(f"{n} Puts (PutMany) in {took:.2f} s with a subscriber that never reads; "
              f"it got the first {stuck_msgs} messages, then a gap to seq {m[1]}")
    finally:
        stuck.close()
        reader.close()


def test_off_by_default_and_config(daemon, tmp_path):
    d = daemon()
    assert not d.stats().HasField("events")
    assert "KV events" not in d.stderr_text()
    out = subprocess.run(
        [kvs.KVSTASHD, "--print-config", "--events-listen", "tcp://127.0.0.1:5557"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert 'events_listen: "tcp://127.0.0.1:5557"  # flag --events-listen' in lines
    assert 'events_topic: "auto"  # default' in lines
    assert "events_queue: 16384  # default" in lines
    # A bad endpoint stops the start, naming the flag.
    for bad, words in (("127.0.0.1:5557", "is not tcp://"),
                       (f"ipc://{tmp_path}/no/such/dir/ev.sock", "cannot bind")):
        p = subprocess.run(
            [kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--events-listen", bad],
            capture_output=True, text=True, timeout=30)
        assert p.returncode != 0
        assert "--events-listen" in p.stderr and words in p.stderr, p.stderr

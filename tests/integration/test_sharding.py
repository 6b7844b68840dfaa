"""Sharding (issue 15 item 1, README "Sharding") against real daemons, through the Python
package's sharded Client (libkvstash's kvs_cluster): three kvstashd on the loopback addresses
127.0.0.2-4, one port, found through a local DNS server from Debian (dnsmasq on 127.0.0.77,
answering several A records for one name from a hosts file it re-reads on SIGHUP).

Placement is checked key by key against an independent rendezvous hash in Python (xxhash), on
what each daemon really holds: 10,000 keys spread within a few percent of even; a fourth
daemon added to the records takes only its share (15-35% of the keys move, all to it); records
changed while running are picked up by re-resolution. A daemon killed mid-run turns its keys
into misses within the call's deadline while the others' keys keep hitting (the failover time
is printed); a hung one costs one call its deadline, then none, and comes back after its
backoff. The local daemon (a Unix socket, shared memory) answers gets first and keeps copies.

Run with -s to see the measured spread and failover timings.
"""
import logging
import os
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest
import xxhash

import kvs

kvstash = kvs.client_package()

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq")
                                      else None)
DNS_ADDR = "127.0.0.77"
NAME = "kvstash.shard.test"
SHAPE = dict(layers=1, kv_heads=1, head_dim=16, block_tokens=1)  # 64-byte blocks


def hrw(key, ids):
    """The owner of key among ids, computed here independently of libkvstash: the highest
    XXH64(key, seed=XXH64(id)), the smaller id on a tie (README "Sharding")."""
    return max(sorted(ids),
               key=lambda i: xxhash.xxh64(key, seed=xxhash.xxh64(i.encode()).intdigest())
               .intdigest())


def common_port(hosts, udp=False):
    """A TCP port free on every one of hosts (loopback addresses), and UDP too if asked."""
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
    for _ in range(100):
        socks = []
        try:
            s = socket.socket()
            socks.append(s)
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            for h in hosts:
                for kind in kinds:
                    if (h, kind) != (hosts[0], socket.SOCK_STREAM):
                        t = socket.socket(type=kind)
                        socks.append(t)
                        t.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no port free on all of {hosts}")


def blocks(keys, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, 1, 1, 16)).astype(np.float16) for _ in keys]


def holds(d, ns, keys):
    """Which of keys daemon d holds (its own Exists, over grpcio)."""
    out = []
    for i in range(0, len(keys), 4000):
        out += list(d.stub.Exists(kvs.pb.KeysRequest(namespace=ns, keys=keys[i:i + 4000]),
                                  timeout=30).present)
    return out


def ns_blocks(d, ns):
    for n in d.stats().namespaces:
        if n.spec.name == ns:
            return n.blocks
    return 0


def rpc_calls(d, method):
    return sum(r.calls for r in d.stats().rpcs if r.method == method)


def put_all(c, ns, keys, data, step=2500):
    res = []
    for i in range(0, len(keys), step):
        res += c.put_many(ns, zip(keys[i:i + step], data[i:i + step]))
    return res


def get_all(c, ns, keys, step=2500, **kw):
    out = []
    for i in range(0, len(keys), step):
        out += c.get_many(ns, keys[i:i + step], **kw)
    return out


@pytest.fixture
def trio(daemon):
    """Three daemons on 127.0.0.2, .3 and .4, one port (as one Service's pods would be)."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    port = common_port(hosts)
    ds = [daemon(host_capacity="64M", listen=f"{h}:{port}") for h in hosts[:3]]
    return ds, port, daemon


class Dnsmasq:
    """dnsmasq answering A records of NAME from a hosts file, on DNS_ADDR:port."""

    def __init__(self, workdir, addrs):
        self.hosts = os.path.join(workdir, "hosts")
        self.logpath = os.path.join(workdir, "dnsmasq.log")
        # An empty config of its own (not /dev/null: seen replaced by a regular file that
        # other programs write to on a shared test machine).
        conf = os.path.join(workdir, "dnsmasq.conf")
        open(conf, "w").close()
        self._write(addrs)
        for attempt in range(5):  # a port taken between the check and dnsmasq's bind
            self.port = common_port([DNS_ADDR], udp=True)
            self.log = open(self.logpath, "wb")
            argv = [DNSMASQ, "--keep-in-foreground", f"--conf-file={conf}", "--no-resolv",
                    "--no-hosts", f"--addn-hosts={self.hosts}", f"--listen-address={DNS_ADDR}",
                    "--bind-interfaces", f"--port={self.port}", "--pid-file=",
                    "--log-facility=-", "--log-queries"]
            if os.geteuid() == 0:  # it would drop to 'nobody', who cannot read a 0700 tmpdir
                argv.append("--user=root")
            self.proc = kvs.spawn(argv, stdout=self.log, stderr=self.log)
            kvs.wait_for(lambda: self._reads() >= 1 or self.proc.poll() is not None,
                         "dnsmasq start")
            if self.proc.poll() is None:
                return
            self.log.close()
        raise AssertionError(f"dnsmasq did not start: {self._text()}")

    def _text(self):
        with open(self.logpath, "rb") as f:
            return f.read().decode(errors="replace")

    def _reads(self):
        return self._text().count(f"read {self.hosts}")

    def _write(self, addrs):
        tmp = self.hosts + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{a} {NAME}\n" for a in addrs)
        os.replace(tmp, self.hosts)

    def set(self, addrs):
        """New records for NAME, served once this returns."""
        before = self._reads()
        self._write(addrs)
        self.proc.send_signal(signal.SIGHUP)
        kvs.wait_for(lambda: self._reads() > before, "dnsmasq re-reading its hosts file")

    def target(self, port):
        return f"dns://{DNS_ADDR}:{self.port}/{NAME}:{port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def dns(tmp_path):
    if not DNSMASQ:
        pytest.skip("dnsmasq is not installed (deploy/dev.sh test installs dnsmasq-base)")
    servers = []

    def start(addrs):
        s = Dnsmasq(str(tmp_path), addrs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


# ----------------------------------------------------------------------------- calls


def test_calls_place_each_key_on_its_owner(trio):
    ds, port, _ = trio
    ids = [d.target for d in ds]
    with kvstash.Client(ids, timeout_ms=5000) as c:
        name = kvs.ns_name("shard")
        c.create_namespace(name, **SHAPE)
        assert all(ns_blocks(d, name) == 0 for d in ds)  # created on every daemon
        assert [n["id"] for n in c.nodes()] == sorted(ids)
        keys = kvstash.block_keys(list(range(300)), 1)
        data = blocks(keys)
        assert all(isinstance(r, kvstash.PutResult) for r in c.put_many(name, zip(keys, data)))
        for k in keys:
            assert c.owner(k) == hrw(k, ids)
        for d in ds:  # each block on its owner, and there only
            assert holds(d, name, keys) == [hrw(k, ids) == d.target for k in keys]
        got = c.get_many(name, keys)
        assert all((g == x).all() for g, x in zip(got, data))
        assert c.lookup(name, keys)[0] == 300

        # A prefix across daemons stops at the first miss of the merged key order.
        assert c.delete(name, [keys[150]]) == 1
        pre = c.get_prefix(name, keys)
        assert len(pre) == 150 and all((g == x).all() for g, x in zip(pre, data))
        assert c.lookup(name, keys)[0] == 150
        assert c.exists(name, keys[149:152]) == [True, False, True]
        assert c.get_many(name, keys)[150] is None

        c.put(name, keys[150], data[150])
        assert (c.get(name, keys[150]) == data[150]).all()
        assert c.namespace(name).layers == 1
        with pytest.raises(kvstash.KvstashError, match="one of nodes"):
            c.stats()
        assert c.drop_namespace(name) == 300
        assert all(ns_blocks(d, name) == 0 for d in ds)
    # The comma-separated form is the same cluster.
    with kvstash.Client(",".join(ids)) as c:
        assert len(c.nodes()) == 3


def test_spread_of_10k_keys(trio):
    ds, port, _ = trio
    ids = [d.target for d in ds]
    n = 10000
    with kvstash.Client(ids, timeout_ms=20000) as c:
        name = kvs.ns_name("spread")
        c.create_namespace(name, **SHAPE)
        keys = kvstash.block_keys(list(range(n)), 1)
        res = put_all(c, name, keys, blocks(keys))
        assert all(isinstance(r, kvstash.PutResult) for r in res)
        counts = [ns_blocks(d, name) for d in ds]
        want = [sum(hrw(k, ids) == i for k in keys) for i in ids]
        dev = max(abs(x - n / 3) / (n / 3) for x in counts)
        print(f"\nspread of {n} keys over {ids}: {counts} (max {dev:.1%} from even)")
        assert counts == want  # exactly where the independent hash puts them
        assert dev < 0.06, counts


# ----------------------------------------------------------------------------- failures


def test_daemon_killed_mid_run(trio, caplog):
    caplog.set_level(logging.INFO, logger="kvstash")  # the cluster's events
    ds, port, _ = trio
    ids = [d.target for d in ds]
    victim = ds[1]
    deadline_ms = 2000
    with kvstash.Client(ids, timeout_ms=deadline_ms, backoff_ms=(100, 1000)) as c:
        name = kvs.ns_name("kill")
        c.create_namespace(name, **SHAPE)
        keys = kvstash.block_keys(list(range(3000)), 1)
        data = blocks(keys)
        put_all(c, name, keys, data)
        on_victim = [hrw(k, ids) == victim.target for k in keys]
        calls, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                t0 = time.monotonic()
                got = c.get_many(name, keys)
                calls.append((t0, time.monotonic(), [g is not None for g in got]))

        th = threading.Thread(target=reader)
        th.start()
        time.sleep(0.5)
        t_kill = time.monotonic()
        victim.kill()  # SIGKILL, by pid; returns once it is reaped
        t_dead = time.monotonic()
        time.sleep(1.5)
        stop.set()
        th.join(30)
        assert not th.is_alive()

        before = [x for x in calls if x[1] < t_kill]
        after = [x for x in calls if x[0] > t_dead]  # a signal takes a moment to land
        assert before and all(all(hit) for _, _, hit in before)
        assert after, "no call after the kill"
        converged = [x for x in calls if x[1] > t_kill and
                     all(h != v for h, v in zip(x[2], on_victim))]
        assert converged
        failover = converged[0][1] - t_kill
        slowest = max(t1 - t0 for t0, t1, _ in calls if t1 > t_kill)
        for t0, t1, hit in after:
            # The victim's keys are misses, every other key still hits, within the deadline.
            assert all(h != v for h, v in zip(hit, on_victim))
            assert t1 - t0 < deadline_ms / 1000
        node = [x for x in c.nodes() if x["id"] == victim.target][0]
        def median(xs):
            return sorted(t1 - t0 for t0, t1, _ in xs)[len(xs) // 2] * 1e3

        print(f"\nkilled {victim.target} ({sum(on_victim)} of {len(keys)} keys): its keys were "
              f"misses {failover * 1e3:.1f} ms after SIGKILL; slowest call since "
              f"{slowest * 1e3:.1f} ms; {len(after)} calls after the kill, median "
              f"{median(after):.1f} ms ({median(before):.1f} ms before; deadline {deadline_ms} "
              f"ms); node: up={node['up']} failures={node['failures']}")
        assert not node["up"] and victim.target in node["why"]
        assert f"cluster: {victim.target} marked down" in caplog.text
        assert failover < deadline_ms / 1000

        # Puts to the dead owner fail item by item (UNAVAILABLE), never re-placed.
        new = kvstash.block_keys(list(range(5000, 5300)), 1)
        res = c.put_many(name, zip(new, blocks(new, seed=1)))
        for k, r in zip(new, res):
            if hrw(k, ids) == victim.target:
                assert isinstance(r, kvstash.KvstashError) and r.status == "UNAVAILABLE", r
            else:
                assert isinstance(r, kvstash.PutResult), r
        for d in (ds[0], ds[2]):
            assert holds(d, name, new) == [hrw(k, ids) == d.target for k in new]


def test_daemon_hung_then_back(trio, caplog):
    caplog.set_level(logging.INFO, logger="kvstash")  # the cluster's events
    ds, port, _ = trio
    ids = [d.target for d in ds]
    victim = ds[2]
    with kvstash.Client(ids, timeout_ms=1000, backoff_ms=(100, 400)) as c:
        name = kvs.ns_name("hang")
        c.create_namespace(name, **SHAPE)
        keys = kvstash.block_keys(list(range(600)), 1)
        data = blocks(keys)
        put_all(c, name, keys, data)
        on_victim = [hrw(k, ids) == victim.target for k in keys]
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = c.get_many(name, keys)
            first = time.monotonic() - t0
            assert [g is not None for g in got] == [not v for v in on_victim]
            t0 = time.monotonic()
            got = c.get_many(name, keys)
            second = time.monotonic() - t0
            assert [g is not None for g in got] == [not v for v in on_victim]
            assert 0.9 < first < 2.0, first  # the deadline, once
            assert second < 0.5, second     # then the daemon is not waited for
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        t_cont = time.monotonic()
        kvs.wait_for(lambda: all(g is not None for g in c.get_many(name, keys)),
                     "the daemon back after SIGCONT", timeout=20)
        back = time.monotonic() - t_cont
        print(f"\nhung {victim.target} (SIGSTOP): first call {first * 1e3:.0f} ms (deadline "
              f"1000 ms), next {second * 1e3:.1f} ms; its keys hit again "
              f"{back * 1e3:.0f} ms after SIGCONT (backoff 100-400 ms)")
        assert [x["up"] for x in c.nodes()] == [True] * 3
        assert f"cluster: {victim.target} is back up" in caplog.text


# ----------------------------------------------------------------------------- DNS


def test_dns_added_and_changed_records(trio, dns, caplog):
    caplog.set_level(logging.INFO, logger="kvstash")  # the cluster's events
    ds, port, daemon = trio
    ids = [d.target for d in ds]
    server = dns([d.host for d in ds])
    n = 10000
    with kvstash.Client(server.target(port), timeout_ms=20000, resolve_ms=200) as c:
        assert [x["id"] for x in c.nodes()] == ids
        name = kvs.ns_name("dns")
        c.create_namespace(name, **SHAPE)
        keys = kvstash.block_keys(list(range(n)), 1)
        data = blocks(keys)
        put_all(c, name, keys, data)
        counts = [ns_blocks(d, name) for d in ds]
        assert counts == [sum(hrw(k, ids) == i for k in keys) for i in ids]
        print(f"\nDNS {server.target(port)}: {n} keys as {counts}")

        # A daemon is added to the records: re-resolution picks it up; only the keys it
        # now owns move (they are misses until stored again).
        fourth = daemon(host_capacity="64M", listen=f"127.0.0.5:{port}")
        t0 = time.monotonic()
        server.set([d.host for d in ds] + ["127.0.0.5"])
        kvs.wait_for(lambda: len(c.nodes()) == 4, "the fourth daemon in the ring")
        seen = time.monotonic() - t0
        ids4 = ids + [fourth.target]
        got = get_all(c, name, keys)
        missed = [g is None for g in got]
        moved = sum(missed)
        print(f"4th daemon {fourth.target}: in the ring {seen * 1e3:.0f} ms after the record "
              f"(resolve every 200 ms); {moved} of {n} keys ({moved / n:.1%}) moved")
        assert 0.15 * n <= moved <= 0.35 * n
        assert f"4 daemons now (added: {fourth.target}; removed: none)" in caplog.text
        assert missed == [hrw(k, ids4) == fourth.target for k in keys]
        assert all((g == x).all() for g, x in zip(got, data) if g is not None)
        # Stored again, they land on the new daemon (the namespace created there on the
        # way, from the spec the cluster remembers).
        again = [(k, x) for k, x, m in zip(keys, data, missed) if m]
        res = c.put_many(name, again)
        assert all(isinstance(r, kvstash.PutResult) for r in res), res[:3]
        assert ns_blocks(fourth, name) == moved
        assert all(g is not None for g in get_all(c, name, keys))

        # A record removed: its daemon leaves the ring and is no longer asked.
        gone = ds[1]
        server.set([ds[0].host, ds[2].host, "127.0.0.5"])
        kvs.wait_for(lambda: gone.target not in [x["id"] for x in c.nodes()],
                     "the removed record's daemon out of the ring")
        ids3 = [ds[0].target, ds[2].target, fourth.target]
        calls = rpc_calls(gone, "GetMany")
        got = get_all(c, name, keys)
        assert [g is None for g in got] == [hrw(k, ids4) == gone.target for k in keys]
        assert rpc_calls(gone, "GetMany") == calls
        for k in keys[:200]:
            assert c.owner(k) == hrw(k, ids3)

        # The DNS server stops answering: the last ring stays.
        server.stop()
        time.sleep(0.8)
        assert [x["id"] for x in c.nodes()] == ids3
        assert "keeping the daemons known" in caplog.text
        assert sum(g is not None for g in get_all(c, name, keys[:1000])) > 0


# ----------------------------------------------------------------------------- local


@pytest.fixture
def unix_local(tmp_path_factory):
    """The node's own daemon, on a Unix socket (its region socket on: shared memory)."""
    d = tmp_path_factory.mktemp("local")
    sock = str(d / "kvs.sock")
    err = open(d / "stderr", "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "unix:" + sock, "--host-capacity", "64M",
                      *kvs.KVSTASHD_EXTRA], stdout=err, stderr=err)
    kvs.wait_for(lambda: os.path.exists(sock + ".region"), "the local daemon's sockets")
    yield "unix:" + sock
    proc.terminate()
    assert proc.wait(30) == 0
    err.close()


def test_local_daemon_first(trio, unix_local):
    ds, port, _ = trio
    ids = [d.target for d in ds]
    with kvstash.Client(ids, local=unix_local, timeout_ms=3000) as c, \
            kvstash.Client(unix_local) as loc:
        name = kvs.ns_name("local")
        c.create_namespace(name, **SHAPE)
        assert loc.namespace(name).layers == 1  # namespaces go to the local daemon too
        keys = kvstash.block_keys(list(range(60)), 1)
        data = blocks(keys)
        c.put_many(name, zip(keys, data))
        assert loc.exists(name, keys) == [True] * 60  # a copy of every block
        for d in ds:
            assert holds(d, name, keys) == [hrw(k, ids) == d.target for k in keys]

        before = [rpc_calls(d, "GetMany") for d in ds]
        got = c.get_many(name, keys)
        assert c.last_path == "shm"  # through a region with the local daemon
        assert all((g == x).all() for g, x in zip(got, data))
        assert [rpc_calls(d, "GetMany") for d in ds] == before  # no owner was asked

        # An owner dies: the local copies still answer; asking the owners only misses.
        victim = [d for d in ds if d.target == hrw(keys[0], ids)][0]
        victim.kill()
        got = c.get_many(name, keys)
        assert all(g is not None and (g == x).all() for g, x in zip(got, data))
        assert c.lookup(name, keys)[0] == 60
        owners_only = c.get_many(name, keys, local_first=False)
        assert [g is None for g in owners_only] == [hrw(k, ids) == victim.target for k in keys]
        # A delete that cannot reach an owner says so (after deleting the rest).
        with pytest.raises(kvstash.KvstashError) as e:
            c.delete(name, keys[:10])
        assert e.value.status == "UNAVAILABLE" and victim.target in str(e.value)
        assert loc.exists(name, keys[:10]) == [False] * 10
        assert c.get_many(name, keys[:10], local_first=False) == [None] * 10


def test_local_id_routes_its_keys_locally(trio, unix_local):
    """With local_id, the keys the local daemon owns in the ring travel over the local
    channel (here a stand-in: the ring member of that id gets nothing) and get no copy."""
    ds, port, _ = trio
    ids = [d.target for d in ds]
    with kvstash.Client(ids, local=unix_local, local_id=ids[0]) as c, \
            kvstash.Client(unix_local) as loc:
        name = kvs.ns_name("localid")
        c.create_namespace(name, **SHAPE)
        keys = kvstash.block_keys(list(range(90)), 1)
        data = blocks(keys)
        c.put_many(name, zip(keys, data))
        # Not even the namespace: the local channel stands for that member.
        assert name not in [n.spec.name for n in ds[0].stats().namespaces]
        assert loc.exists(name, keys) == [True] * 90
        for d in ds[1:]:
            assert holds(d, name, keys) == [hrw(k, ids) == d.target for k in keys]
        assert all((g == x).all() for g, x in zip(c.get_many(name, keys), data))


def test_paths_of_a_sharded_client(trio, unix_local):
    """The data paths of a sharded Client (README "Sharding"): shared memory with its local
    daemon only (grpc without one, where path="shm" says why), and no CUDA IPC: a region
    registered by IPC reaches only its own daemon, not the keys' owners, so path="ipc" is
    refused when the Client is made and "auto" never tries it (CUDA tensors, where torch
    has a GPU, go through the local daemon's shared memory)."""
    ds, port, _ = trio
    ids = [d.target for d in ds]
    with pytest.raises(ValueError, match="path='ipc' needs one daemon"):
        kvstash.Client(ids, path="ipc")
    with pytest.raises(ValueError, match="path='ipc' needs one daemon"):
        kvstash.Client(ids, local=unix_local, path="ipc")
    name = kvs.ns_name("paths")
    keys = kvstash.block_keys(list(range(20)), 1)
    data = blocks(keys, seed=5)

    def stored(results):
        return all(isinstance(r, kvstash.PutResult) for r in results)
    with kvstash.Client(ids) as remote, kvstash.Client(ids, path="shm") as forced, \
            kvstash.Client(ids, local=unix_local, path="shm") as local:
        remote.create_namespace(name, **SHAPE)
        assert stored(remote.put_many(name, zip(keys, data)))
        assert remote.last_path == "grpc"
        assert all((g == x).all() for g, x in zip(remote.get_many(name, keys), data))
        assert remote.last_path == "grpc"
        with pytest.raises(kvstash.KvstashError) as e:
            forced.get_many(name, keys)
        assert e.value.status == "UNIMPLEMENTED" and "without `local`" in str(e.value)
        assert stored(local.put_many(name, zip(keys, data)))
        assert local.last_path == "shm"
        got = local.get_many(name, keys, local_first=False)  # the owners, through the region
        assert local.last_path == "shm" and all((g == x).all() for g, x in zip(got, data))
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: IPC's absence shown on host data only")
        with kvstash.Client(ids, local=unix_local) as c:
            src = [torch.from_numpy(x).cuda() for x in data]
            assert stored(c.put_many(name, zip(keys, src)))
            assert c.last_path == "shm"
            out = [torch.empty_like(t) for t in src]
            c.get_many(name, keys, out=out)
            assert c.last_path == "shm" and all(torch.equal(a, b) for a, b in zip(out, src))
            assert len(c._ipc) == 0  # nothing was registered


def test_paged_calls_of_a_sharded_client(trio, unix_local):
    """Paged layouts with a sharded Client: the package gathers and scatters a host cache
    itself, so put_many_paged / get_many_paged place each block on its owner like put_many
    and restore it bit for bit; libkvstash's own paged calls name one daemon's region, and
    the cluster's refuse them (KVS_ENOTSUP naming the field) rather than split a page list
    whose indexes are the items' places in one call."""
    import ctypes
    ds, port, _ = trio
    ids = [d.target for d in ds]
    name = kvs.ns_name("pgshard")
    lay = kvstash.PageLayout.vllm(1, 40, 1, 1, 16)  # one token per page, as SHAPE
    cache = np.random.default_rng(4).standard_normal(2 * 40 * 16).astype(np.float16)
    keys = kvstash.block_keys(list(range(20)), 1)
    with kvstash.Client(ids, local=unix_local) as c:
        c.create_namespace(name, **SHAPE)
        res = c.put_many_paged(name, keys, cache, lay, [[i] for i in range(20)])
        assert all(isinstance(r, kvstash.PutResult) for r in res), res
        for d in ds:
            assert holds(d, name, keys) == [hrw(k, ids) == d.target for k in keys]
        assert c.get_many_paged(name, keys, cache, lay, [[20 + i] for i in range(20)]) == 20
        pages = cache.reshape(2, 40, 16)  # [K|V][page][dim]
        assert (pages[:, 20:] == pages[:, :20]).all()
        lib = kvstash._lib
        kb = vb = (ctypes.c_uint64 * 1)(0)
        pl = lib.PageLayout(1, 1, kb, vb, 32, 32, 32)
        gi = (lib.GetItem * 1)()
        gi[0].key, gi[0].key_len = ctypes.cast(ctypes.c_char_p(keys[0]), ctypes.c_void_p), \
            len(keys[0])
        gi[0].buf, gi[0].cap = ctypes.cast(ctypes.create_string_buffer(64), ctypes.c_void_p), 64
        pg = (ctypes.c_uint32 * 1)(0)
        opts = lib.GetManyOpts(0, 0, 0, False, 0, ctypes.pointer(pl), pg, 1)
        served, err = ctypes.c_size_t(), lib.Err()
        rc = lib.lib.kvs_cluster_get_many(c._h, name.encode(), gi, 1, ctypes.byref(opts),
                                          ctypes.byref(served), ctypes.byref(err))
        assert rc == -30012 and b"layout" in err.msg, (rc, err.msg)  # KVS_ENOTSUP
        pi = (lib.PutItem * 1)()
        pi[0].key, pi[0].key_len, pi[0].tokens = gi[0].key, gi[0].key_len, 1
        pi[0].data, pi[0].len, pi[0].pages, pi[0].n_pages = gi[0].buf, 64, pg, 1
        rc = lib.lib.kvs_cluster_put_many(c._h, name.encode(), 1, pi, 1, ctypes.byref(err))
        assert rc in (-30001, -30012) and b"pages" in err.msg, (rc, err.msg)


def test_client_forms_and_errors():
    # NOT_FOUND where a resolver says the name does not exist; UNAVAILABLE where none can
    # be asked (the GPU machine has no network): the same answer the system's own gives.
    try:
        socket.getaddrinfo("no-such-name.invalid", 50051)
        pytest.fail("no-such-name.invalid resolved")
    except socket.gaierror as g:
        want = "NOT_FOUND" if g.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA",
                                                                       socket.EAI_NONAME)) \
            else "UNAVAILABLE"
    with pytest.raises(kvstash.KvstashError) as e:
        kvstash.Client("dns:///no-such-name.invalid:50051")
    assert e.value.status == want and "no-such-name.invalid" in str(e.value)
    with pytest.raises(kvstash.KvstashError, match="given twice"):
        kvstash.Client(["127.0.0.1:1", "127.0.0.1:1"])
    with pytest.raises(ValueError, match="one daemon"):
        kvstash.Client(["127.0.0.1:1", "127.0.0.1:2"], gpu_decode="on")
    with kvstash.Client(["127.0.0.1:1", "127.0.0.1:2"], timeout_ms=2000) as c:
        # Nothing listens there: every key is a miss, every put UNAVAILABLE, no hang.
        t0 = time.monotonic()
        with pytest.raises(kvstash.KvstashError) as e:
            c.namespace("x")
        assert e.value.status == "UNAVAILABLE"
        assert time.monotonic() - t0 < 2
        assert [x["up"] for x in c.nodes()] == [False, False]

"""The Python package (client/python/kvstash, issue 13 item 1) against a real daemon: every
call, both batched paths (shared memory with a daemon on this host, gRPC bytes otherwise,
`last_path` telling which ran), errors as exceptions with the gRPC status and the daemon's
message, and the chained block keys of the README."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import kvs

kvstash = kvs.client_package()


@pytest.fixture(scope="module")
def unix_daemon(tmp_path_factory):
    """A daemon on a Unix socket: its region socket is on, so batches use shared memory."""
    d = tmp_path_factory.mktemp("pyunix")
    sock = str(d / "kvs.sock")
    err = open(d / "stderr", "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "unix:" + sock, "--host-capacity", "256M",
                      *kvs.KVSTASHD_EXTRA], stdout=err, stderr=err)
    for _ in range(200):
        if os.path.exists(sock + ".region"):
            break
        time.sleep(0.05)
    yield "unix:" + sock
    proc.terminate()
    proc.wait(30)
    err.close()


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
        assert c.lookup(name, keys) == (6, ["host"] * 6)
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

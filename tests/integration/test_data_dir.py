"""A data directory whose data.mdb is empty or gone is what is left of a store, never a
new one (issue 10, fault 2: a 0-byte data.mdb silently became an empty store, losing every
durable block and namespace). kvstashd refuses it untouched; --data-dir-reset is the
operator's explicit way to start over, and it keeps the old file."""
import hashlib
import os
import subprocess

import pytest

import kvs


def _snapshot(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _start_refused(tmp_path, data):
    r = subprocess.run([kvs.KVSTASHD, "--listen", "127.0.0.1:0", "--data-dir", str(data),
                        "--host-capacity", "64M"], capture_output=True, timeout=30,
                       cwd=tmp_path)
    return r.returncode, r.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("damage", ["empty", "gone", "truncated"])
def test_broken_data_file_is_refused_untouched_then_reset(daemon, tmp_path, damage):
    data = tmp_path / "data"
    d = daemon(extra=["--data-dir", data])
    ns = kvs.Ns(kvs.make_ns(d.admin, durable=True))
    for i in range(20):
        kvs.put(d.stub, ns.name, b"k%d" % i, ns.T, ns.payload(seed=i))
    d.stop()
    f = data / "data.mdb"
    if damage == "empty":
        os.truncate(f, 0)
    elif damage == "gone":
        os.unlink(f)
    else:
        os.truncate(f, 2 * 4096)
    before = _snapshot(data)
    rc, err = _start_refused(tmp_path, data)
    assert rc != 0, err
    want = {"empty": "data.mdb is empty", "gone": "no data.mdb", "truncated": "truncated"}
    assert want[damage] in err and "--data-dir-reset" in err, err
    assert _snapshot(data) == before, "a refused directory was changed"

    # The operator's explicit choice: a new store, the old data.mdb kept aside.
    d2 = daemon(extra=["--data-dir", data, "--data-dir-reset"])
    names = [n.spec.name for n in d2.admin.ListNamespaces(kvs.pb.ListNamespacesRequest()).namespaces]
    assert ns.name not in names
    kept = [n for n in os.listdir(data) if n.startswith("data.mdb.broken-")]
    if damage != "gone":
        assert len(kept) == 1, os.listdir(data)
        with open(data / kept[0], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == before["data.mdb"]
    ns2 = kvs.Ns(kvs.make_ns(d2.admin, durable=True))
    kvs.put(d2.stub, ns2.name, b"new", ns2.T, ns2.payload())
    d2.stop()
    # Later starts need no flag: the new store is whole, the kept file tolerated.
    d3 = daemon(extra=["--data-dir", data])
    assert kvs.get(d3.stub, ns2.name, b"new").data == ns2.payload()
    assert "data.mdb.broken-" in d3.stderr_text() or damage == "gone"


def test_reset_needs_a_data_dir(tmp_path):
    r = subprocess.run([kvs.KVSTASHD, "--data-dir-reset"], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"--data-dir-reset: needs --data-dir" in r.stderr

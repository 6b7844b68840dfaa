"""kvctl against a real daemon, cross-checked through the Python client: namespaces,
put/get byte-exact in both directions, lookup, delete, stats --json, chained keys
(against Python's xxhash), bench, progress bars (verify, flush, bench), --help of every
command, and a dead target."""
import json
import os
import pty
import re
import socket
import struct
import subprocess

import pytest
import xxhash

import kvs
from kvs import BF16, pb

COMMANDS = [["status"], ["ns", "create"], ["ns", "list"], ["ns", "drop"], ["put"], ["get"],
            ["lookup"], ["exists"], ["delete"], ["key"], ["stats"], ["bench"]]

ADMIN = "kvctl-admin"


def ok(r):
    """Asserts a kvctl CompletedProcess exited 0; returns its stdout as text."""
    assert r.returncode == 0, (f"kvctl exited {r.returncode}\nstdout: {r.stdout.decode()}\n"
                               f"stderr: {r.stderr.decode()}")
    return r.stdout.decode("utf-8", "replace")


def chain_keys(tokens, block_tokens):
    """DESIGN §1, written independently: XXH3-128 (seed 0) over the previous key and the
    block's tokens as little-endian uint32, canonical (big-endian) bytes."""
    prev, out = bytes(16), []
    for i in range(0, len(tokens), block_tokens):
        blk = tokens[i:i + block_tokens]
        prev = xxhash.xxh3_128_digest(prev + struct.pack(f"<{len(blk)}I", *blk), seed=0)
        out.append(prev)
    return out


@pytest.fixture(scope="module")
def d(module_daemon):
    return module_daemon(host_capacity="256M")


def list_ns(d):
    return {n.spec.name: n for n in
            d.admin.ListNamespaces(pb.ListNamespacesRequest(), timeout=10).namespaces}


def test_key_vector_file():
    """tests/data/key-vectors.txt, the vectors libkvstash (test_keys.c) and the Python package
    (test_python_client.py) check, from Python's xxhash: an independent implementation."""
    n = 0
    for bt, toks, keys in kvs.key_vectors():
        assert [k.hex() for k in chain_keys(toks, bt)] == keys
        n += 1
    assert n >= 5


def test_key_vectors():
    """The documented vectors, from Python itself (the same ones test_keys.c checks)."""
    z = bytes(16)
    h = lambda prev, toks: xxhash.xxh3_128_digest(  # noqa: E731
        prev + struct.pack(f"<{len(toks)}I", *toks), seed=0)
    assert h(z, []).hex() == "e5189a9599e3f86205ea23ef06e28b2d"
    b = h(z, [1, 2, 3, 4])
    assert b.hex() == "4e7b4f6b8cadfb2a1b1a20c2457494c4"
    assert h(b, [5, 6, 7, 8]).hex() == "bad84e898fec8dace6ba4906880b0aa0"
    assert [k.hex() for k in chain_keys(list(range(100, 110)), 4)] == [
        "5743eca2e6cb4ff364968042efc1ab1c", "167dcada5e24693142f2d30914aa1ff9",
        "c9a792cae25cff850cfce1943543bd36"]
    assert h(z, [0xFFFFFFFF]).hex() == "eba79aae3ad549248e53ecf0a17f8a77"


@pytest.mark.parametrize("tokens,bt", [
    (list(range(100, 110)), 4),
    ([1, 2, 3, 4], 4),
    ([0xFFFFFFFF], 1),
    ([0, 4294967295, 7, 65536, 3], 2),
    (list(range(1000)), 16),
    (list(range(37)), 37),
])
def test_key_matches_python(d, tokens, bt):
    out = ok(d.kvctl("key", "--block-tokens", bt, *tokens, target=False))
    assert out.split() == [k.hex() for k in chain_keys(tokens, bt)]
    # --json gives the same list.
    js = json.loads(ok(d.kvctl("--json", "key", "--block-tokens", bt, *tokens, target=False)))
    assert js == [k.hex() for k in chain_keys(tokens, bt)]


def test_key_exact_output(d):
    r = d.kvctl("key", "--block-tokens", "4", *range(100, 110), target=False)
    assert ok(r) == ("5743eca2e6cb4ff364968042efc1ab1c\n167dcada5e24693142f2d30914aa1ff9\n"
                     "c9a792cae25cff850cfce1943543bd36\n")


@pytest.mark.parametrize("args", [["key", "1", "2"], ["key", "--block-tokens", "0", "1"],
                                  ["key", "--block-tokens", "4", "-1"],
                                  ["key", "--block-tokens", "4", "4294967296"],
                                  ["key", "--block-tokens", "4"], ["nope"], []])
def test_usage_errors(d, args):
    r = d.kvctl(*args, target=False)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), "no message on stderr"


def test_ns_create_list_drop(d):
    name = kvs.ns_name("kvctl")
    ok(d.kvctl("--token", ADMIN, "ns", "create", name, "--layers", 4, "--kv-heads", 2,
               "--head-dim", 64, "--block-tokens", 16, "--dtype", "bf16", "--seed", 77))
    info = list_ns(d)[name]
    s = info.spec
    assert (s.layers, s.kv_heads, s.head_dim, s.block_tokens, s.dtype, s.seed) == \
        (4, 2, 64, 16, BF16, 77)
    assert s.key_codec == "none" and s.value_codec == "none"

    out = ok(d.kvctl("ns", "list"))
    line = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name]
    assert len(line) == 1, out
    js = json.loads(ok(d.kvctl("ns", "list", "--json")))
    mine = [n for n in js if n["name"] == name]
    assert len(mine) == 1
    assert (mine[0]["layers"], mine[0]["kv_heads"], mine[0]["head_dim"],
            mine[0]["block_tokens"], mine[0]["dtype"]) == (4, 2, 64, 16, "bf16")
    assert mine[0]["block_bytes"] == kvs.block_bytes(4, 2, 64, 16)

    # Duplicate: exit 1 with the server's message.
    r = d.kvctl("ns", "create", name, "--layers", 4, "--kv-heads", 2, "--head-dim", 64,
                "--block-tokens", 16)
    assert r.returncode == 1 and b"exists" in r.stderr, r.stderr
    # A bad spec: the message names the field.
    r = d.kvctl("ns", "create", kvs.ns_name("kvctl"), "--layers", 4, "--kv-heads", 2,
                "--head-dim", 24, "--block-tokens", 16)
    assert r.returncode in (1, 2) and b"head" in r.stderr, r.stderr

    ns = kvs.Ns(info)
    for i in range(3):
        kvs.put(d.stub, name, bytes([i]), 16, ns.payload(16), dtype=BF16)
    out = ok(d.kvctl("ns", "drop", name))
    assert "3" in out, out
    assert name not in list_ns(d)
    r = d.kvctl("ns", "drop", name)
    assert r.returncode == 1 and b"not found" in r.stderr, r.stderr


def test_put_get_files(d, tmp_path):
    name = kvs.ns_name("kvctl")
    ok(d.kvctl("ns", "create", name, "--layers", 4, "--kv-heads", 2, "--head-dim", 64,
               "--block-tokens", 16))
    ns = kvs.Ns(list_ns(d)[name])

    # kvctl put -> Python get (full and partial block; literal and hex keys).
    for t, key, arg in ((16, b"file-key", "file-key"), (5, b"\x00\xff\x10", "hex:00ff10")):
        data = ns.payload(t, seed=t)
        f = tmp_path / f"in{t}.bin"
        f.write_bytes(data)
        ok(d.kvctl("put", name, arg, f))
        g = kvs.get(d.stub, name, key)
        assert g.header.tokens == t
        assert g.data == data

    # Explicit --tokens and a small --chunk.
    data = ns.payload(7, seed=70)
    f = tmp_path / "in7.bin"
    f.write_bytes(data)
    ok(d.kvctl("--chunk", "1K", "put", name, "seven", f, "--tokens", 7))
    assert kvs.get(d.stub, name, b"seven").data == data

    # Python put -> kvctl get, whole and a layer range.
    data = ns.payload(11, seed=11)
    kvs.put(d.stub, name, b"py", 11, data)
    out = tmp_path / "out.bin"
    ok(d.kvctl("get", name, "py", out))
    assert out.read_bytes() == data
    lb = ns.layer_bytes(11)
    ok(d.kvctl("get", name, "py", out, "--layers", "1:3"))
    assert out.read_bytes() == data[lb:3 * lb]
    ok(d.kvctl("get", name, "py", out, "--layers", "2:"))
    assert out.read_bytes() == data[2 * lb:]
    # To stdout.
    r = d.kvctl("get", name, "py", "-")
    assert ok(r) is not None and r.stdout == data
    # From stdin.
    data2 = ns.payload(16, seed=160)
    ok(d.kvctl("put", name, "stdin-key", "-", input=data2))
    assert kvs.get(d.stub, name, b"stdin-key").data == data2
    # ENCODED is not served yet: exit 1, and the message says why.
    r = d.kvctl("get", name, "py", out, "--encoded")
    assert r.returncode == 0 and b"encoded" in r.stderr.lower(), r.stderr
    hdr, sections = kvs.parse_encoded(out.read_bytes())
    assert hdr["tokens"] > 0 and len(sections) == 2 * hdr["layers"]
    # A bad layer range: the daemon's message names the layer field.
    r = d.kvctl("get", name, "py", out, "--layers", "3:9")
    assert r.returncode in (1, 2) and b"layer" in r.stderr, r.stderr

    # A file of a size no token count gives: refused, nothing stored.
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-2])
    r = d.kvctl("put", name, "bad", bad)
    assert r.returncode in (1, 2), r
    assert list(d.stub.Exists(pb.KeysRequest(namespace=name, keys=[b"bad"])).present) == [False]
    # --tokens disagreeing with the size: the daemon's payload check answers.
    r = d.kvctl("put", name, "bad", f, "--tokens", 8)
    assert r.returncode in (1, 2) and r.stderr, r

    # A missing key: exit 1, the message names the key, and no output file is left.
    gone = tmp_path / "gone.bin"
    r = d.kvctl("get", name, "nope", gone)
    assert r.returncode == 1 and b"key" in r.stderr, r.stderr
    assert not gone.exists()


def test_lookup_exists_delete(d, tmp_path):
    name = kvs.ns_name("kvctl")
    ok(d.kvctl("ns", "create", name, "--layers", 2, "--kv-heads", 1, "--head-dim", 16,
               "--block-tokens", 4))
    ns = kvs.Ns(list_ns(d)[name])
    toks = list(range(500, 520))  # 5 blocks
    keys = chain_keys(toks, 4)
    printed = ok(d.kvctl("key", "--block-tokens", 4, *toks, target=False)).split()
    assert printed == [k.hex() for k in keys]
    for k in keys[:3]:
        kvs.put(d.stub, name, k, 4, ns.payload(4))
    hexkeys = [f"hex:{k.hex()}" for k in keys]

    out = ok(d.kvctl("lookup", name, *hexkeys))
    assert "prefix 3 of 5" in out, out
    js = json.loads(ok(d.kvctl("--json", "lookup", name, *hexkeys)))
    assert js["prefix"] == 3
    assert [e["tier"] for e in js["keys"]] == ["host"] * 3 + ["none"] * 2

    js = json.loads(ok(d.kvctl("exists", name, hexkeys[0], hexkeys[4], "--json")))
    assert js == {hexkeys[0]: True, hexkeys[4]: False}

    out = ok(d.kvctl("delete", name, hexkeys[0], hexkeys[1], hexkeys[4]))
    assert "deleted 2 of 3" in out, out
    assert list(d.stub.Exists(pb.KeysRequest(namespace=name, keys=keys[:3])).present) == \
        [False, False, True]
    js = json.loads(ok(d.kvctl("--json", "delete", name, hexkeys[2])))
    assert js["deleted"] == 1
    # Bad keys are usage errors (no call made).
    r = d.kvctl("lookup", name, "hex:zz")
    assert r.returncode == 2 and r.stderr
    r = d.kvctl("lookup", name, "k" * 65)
    assert r.returncode == 2 and r.stderr


def test_stats_json(d):
    name = kvs.ns_name("kvctl")
    ns = kvs.Ns(kvs.make_ns(d.admin, name=name, L=2, H=2, D=16, T=4))
    for i in range(4):
        kvs.put(d.stub, name, bytes([i]), 4, ns.payload(4))
    js = json.loads(ok(d.kvctl("stats", "--json")))
    assert js["version"]
    host = [t for t in js["tiers"] if t["tier"] == "host"]
    assert len(host) == 1 and host[0]["capacity_bytes"] == 256 << 20
    assert host[0]["blocks"] >= 4
    mine = [n for n in js["namespaces"] if n["name"] == name]
    assert len(mine) == 1
    assert mine[0]["blocks"] == 4
    assert mine[0]["raw_bytes"] == 4 * ns.bytes()
    assert mine[0]["tokens"] == 16
    assert any(r["method"].endswith("Put") and r["calls"] >= 4 for r in js["rpcs"]), js["rpcs"]
    # The human table mentions the namespace too.
    assert name in ok(d.kvctl("stats"))
    assert "serving" in ok(d.kvctl("status")).lower()


def test_bench(d):
    name = kvs.ns_name("bench")
    kvs.make_ns(d.admin, name=name, L=4, H=2, D=64, T=16)
    out = ok(d.kvctl("bench", name, "--blocks", 20, "--threads", 2, timeout=120))
    assert "verified 20/20" in out, out
    js = json.loads(ok(d.kvctl("--json", "bench", name, "--blocks", 8, "--threads", 2,
                               "--seed", 5)))
    assert js["verified"] == 8 and js["ok"] is True, js
    # More threads than cores, bf16, partial blocks; the blocks are checked from Python
    # too (--keep leaves them in place).
    name2 = kvs.ns_name("bench")
    info = kvs.make_ns(d.admin, name=name2, L=2, H=2, D=32, T=8, dtype=BF16)
    out = ok(d.kvctl("bench", name2, "--blocks", 64, "--threads", 8, "--tokens", 5,
                     "--keep", timeout=120))
    assert "verified 64/64" in out, out
    n = list_ns(d)[name2]
    assert n.blocks == 64 and n.raw_bytes == 64 * kvs.block_bytes(2, 2, 32, 5)
    assert info.id == n.id


def last_bar(err, label):
    """The last progress line of `label` in stderr text (lines, or redraws after \\r)."""
    lines = [l for l in re.split(r"[\r\n]+", err) if l.startswith(label + " ")]
    assert lines, f"no {label!r} progress line in {err!r}"
    return lines[-1].replace("\033[K", "")


def test_progress(daemon, tmp_path):
    """verify, flush and bench draw a progress bar on stderr with --progress (before or
    after the command), stdout byte for byte as without it; without it, with stderr not a
    terminal (a pipe here), nothing; --no-progress wins. The bars of verify and flush are
    drawn from the daemon's AdminProgress counters (Stats), which grow by what each call
    did: 40 host blocks checked, then flushed, then 40 host blocks and 40 records."""
    d = daemon(extra=["--data-dir", tmp_path / "data", "--stats-interval", 0])
    name = kvs.ns_name("prog")
    kvs.make_ns(d.admin, name=name, L=2, H=2, D=64, T=16)
    r = d.kvctl("bench", name, "--blocks", 40, "--keep")
    assert ok(r) and r.stderr == b""
    plain = d.kvctl("verify")
    assert ok(plain) and plain.stderr == b""
    before = d.stats().admin
    r = d.kvctl("verify", "--progress")
    assert r.stdout == plain.stdout and ok(r)
    err = r.stderr.decode()
    assert "\r" not in err and "\033" not in err  # not a terminal: whole lines
    assert err.startswith("verify ") and err.endswith("\n")
    assert re.fullmatch(r"verify \[#{24}\]  40/40 blocks  100%  .*\d+(\.\d)?s",
                        last_bar(err, "verify")), err
    after = d.stats().admin
    assert (after.verify_planned - before.verify_planned,
            after.verify_checked - before.verify_checked) == (40, 40)
    js = d.kvctl("--progress", "--json", "verify")
    assert json.loads(ok(js))["checked"] == 40 and b"40/40 blocks" in js.stderr
    r = d.kvctl("verify", "--progress", "--no-progress")
    assert r.stdout == plain.stdout and r.stderr == b""

    r = d.kvctl("flush", "--progress")
    assert "flushed: 40 host blocks written" in ok(r)
    assert "flush [" + "#" * 24 + "]  40/40 blocks  100%" in last_bar(r.stderr.decode(), "flush")
    now = d.stats().admin
    assert (now.flush_queued - after.flush_queued, now.flush_done - after.flush_done) == (40, 40)
    r = d.kvctl("--progress", "verify")
    assert "80/80 blocks  100%" in last_bar(r.stderr.decode(), "verify")  # + the 40 records

    r = d.kvctl("bench", name, "--blocks", 8, "--seed", 9, "--progress")
    assert "verified 8/8" in ok(r)
    err = r.stderr.decode()
    for phase in ("bench put", "bench get"):
        assert "8/8 blocks  100%" in last_bar(err, phase), err


def kvctl_tty_stderr(*args):
    """Runs kvctl with stderr on a pseudo-terminal; returns (CompletedProcess, its stderr)."""
    master, slave = pty.openpty()
    try:
        r = subprocess.run([kvs.KVCTL, *map(str, args)], stdout=subprocess.PIPE, stderr=slave,
                           stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    return r, err.decode()


def test_progress_on_a_terminal(d):
    """By default the bar is drawn when stderr is a terminal: redrawn in place (\\r, erase
    to the end of the line) and left on its last line; --no-progress: nothing."""
    name = kvs.ns_name("prog")
    kvs.make_ns(d.admin, name=name, L=2, H=2, D=64, T=16)
    r, err = kvctl_tty_stderr("--target", d.target, "bench", name, "--blocks", 16)
    assert r.returncode == 0 and b"verified 16/16" in r.stdout
    assert "\r" in err and "\033[K" in err
    assert "16/16 blocks  100%" in last_bar(err, "bench get")
    r, err = kvctl_tty_stderr("--target", d.target, "--no-progress", "bench", name, "--blocks", 4)
    assert r.returncode == 0 and err == ""


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c))
def test_help(cmd):
    r = kvs.run_kvctl(*cmd, "--help", timeout=30)
    assert r.returncode == 0, r
    assert b"usage" in r.stdout.lower(), r.stdout
    r = kvs.run_kvctl("help", *cmd, timeout=30)
    assert r.returncode == 0, r


def test_global_help_and_version():
    for args in (["--help"], ["help"], ["--version"]):
        r = kvs.run_kvctl(*args, timeout=30)
        assert r.returncode == 0 and r.stdout, (args, r)


def dead_target():
    """A loopback port with nothing listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("args", [["status"], ["ns", "list"], ["stats"],
                                  ["lookup", "x", "k"], ["get", "x", "k", "-"]],
                         ids=lambda a: "-".join(a))
def test_dead_target(args):
    r = kvs.run_kvctl("--target", dead_target(), "--timeout-ms", "3000", *args,
                      timeout=30)
    assert r.returncode == 1, r
    assert r.stderr.startswith(b"kvctl: "), r.stderr
    assert len(r.stderr.strip()) > len(b"kvctl: "), r.stderr


def test_auth_tokens(module_daemon, tmp_path):
    d = module_daemon(extra=["--token", "ct", "--admin-token", ADMIN], token=ADMIN)
    name = kvs.ns_name("kvctl")
    r = d.kvctl("ns", "create", name, "--layers", 1, "--kv-heads", 1, "--head-dim", 16,
                "--block-tokens", 2)
    assert r.returncode == 1 and b"authorization" in r.stderr.lower(), r.stderr
    r = d.kvctl("--token", "ct", "ns", "create", name, "--layers", 1, "--kv-heads", 1,
                "--head-dim", 16, "--block-tokens", 2)
    assert r.returncode == 1 and b"authorization" in r.stderr.lower(), r.stderr
    ok(d.kvctl("--token", ADMIN, "ns", "create", name, "--layers", 1, "--kv-heads", 1,
               "--head-dim", 16, "--block-tokens", 2))
    data = kvs.payload(1, 1, 16, 2)
    f = tmp_path / "b.bin"
    f.write_bytes(data)
    # put looks the namespace up with ListNamespaces (admin) unless --tokens and --dtype
    # are given; with them the client token is enough.
    ok(d.kvctl("--token", "ct", "put", name, "k", f, "--tokens", 2, "--dtype", "fp16"))
    out = tmp_path / "o.bin"
    ok(d.kvctl("--token", "ct", "get", name, "k", out))
    assert out.read_bytes() == data
    r = d.kvctl("get", name, "k", out)
    assert r.returncode == 1 and b"authorization" in r.stderr.lower(), r.stderr
    # status works without a token (Health is open).
    assert "serving" in ok(d.kvctl("status")).lower()

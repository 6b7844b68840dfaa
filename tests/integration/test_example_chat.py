"""client/python/examples/chat_reuse.py (issue 13 item 4) against a real daemon: a Llama-style
model (the tiny one, on the CPU) chats with several users over a shared system prompt, and
kvstash must hand back exactly the prefix blocks the prompts share, in a form that gives the
same next token and the same logits as a full recompute (codec none), or a close one (kivi-4,
reported by the example, bounded loosely here).

The example runs in this process (its main(), as from the command line), so a failure shows
its table in the captured output. No timings are asserted: those belong to benchmarks."""
import importlib
import json
import os
import sys
import time

import pytest

import kvs

torch = pytest.importorskip("torch")
kvstash = kvs.client_package()
sys.path.insert(0, os.path.join(kvs.REPO, "client", "python", "examples"))
chat = importlib.import_module("chat_reuse")

BT = 16
# The system prompt ends mid-block (200 = 12 blocks + 8 tokens), so the block that straddles
# it and the first user message is private to each user; the first prompt (240 tokens) is
# whole blocks, so its last block is computed, stored and never looked up in its own turn.
USERS, TURNS, SYSTEM, MESSAGE, REPLY = 3, 3, 200, 40, 24
ARGS = ["--model", "tiny", "--device", "cpu", "--users", USERS, "--turns", TURNS,
        "--system-tokens", SYSTEM, "--turn-tokens", MESSAGE, "--reply-tokens", REPLY,
        "--block-tokens", BT]


def expected_turns():
    """(user, turn) -> (prompt tokens, blocks looked up, blocks hit, blocks put), in the
    order the example runs them (turn by turn, users in order)."""
    plen = lambda t: SYSTEM + (t + 1) * MESSAGE + t * REPLY  # noqa: E731  t from 0
    out = {}
    for t in range(TURNS):
        for u in range(USERS):
            p = plen(t)
            look = (p - 1) // BT  # the last token is always computed
            if t == 0:  # user 1 finds nothing; the others, the system prompt's whole blocks
                hit = 0 if u == 0 else min(SYSTEM // BT, look)
            else:       # this user's previous prompt, whole blocks (its reply was never stored)
                hit = min(plen(t - 1) // BT, look)
            out[(u + 1, t + 1)] = (p, look, hit, p // BT - hit)
    return out


@pytest.fixture(scope="module")
def unix_target(tmp_path_factory):
    """A daemon on a Unix socket: its region socket is on, so batches use shared memory."""
    d = tmp_path_factory.mktemp("chat-unix")
    sock = str(d / "kvs.sock")
    err_path = d / "stderr"
    err = open(err_path, "wb")
    proc = kvs.spawn([kvs.KVSTASHD, "--listen", "unix:" + sock, "--host-capacity", "256M",
                      *kvs.KVSTASHD_EXTRA], stdout=err, stderr=err)
    try:
        for _ in range(200):
            if os.path.exists(sock + ".region") or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None and os.path.exists(sock + ".region"), \
            f"kvstashd on {sock} did not start:\n{err_path.read_text(errors='replace')}"
        yield "unix:" + sock
    finally:
        proc.terminate()
        rc = proc.wait(30)
        err.close()
    assert rc == 0, f"kvstashd exited with {rc}:\n{err_path.read_text(errors='replace')}"


def run_example(tmp_path, target, ns, codec, name, restore="direct"):
    """main() of the example as from the command line; returns (exit code, summary)."""
    out = tmp_path / f"{name}.json"
    rc = chat.main([str(a) for a in ARGS] + ["--target", target, "--namespace", ns,
                                             "--codec", codec, "--restore", restore,
                                             "--json", str(out)])
    with open(out) as f:
        return rc, json.load(f)


def check_reuse(s, warm=False):
    """Every turn reused exactly the whole blocks the conversation shares (warm: a rerun
    against the same namespace, where every looked-up block is there)."""
    want = expected_turns()
    got = {(r["user"], r["turn"]): r for r in s["turns"]}
    assert list(got) == list(want), "turn order"
    for ut, (p, look, hit, put) in want.items():
        r = got[ut]
        if warm:
            hit, put = look, p // BT - look
        assert (r["prompt_tokens"], r["blocks_looked_up"], r["blocks_hit"], r["blocks_put"]) \
            == (p, look, hit, put), f"user {ut[0]} turn {ut[1]}: {r}"
        assert r["tokens_reused"] == hit * BT
        assert r["tokens_reused"] + r["tokens_computed"] == p
    t = s["totals"]
    assert t["tokens_reused"] == sum(r["tokens_reused"] for r in got.values())
    assert t["token_hit_ratio"] == t["tokens_reused"] / t["prompt_tokens"]
    assert t["block_hit_ratio"] == t["blocks_hit"] / t["blocks_looked_up"]
    if not warm:  # the story the example tells: turn 1 of user 1 cold, everyone else reusing
        assert got[(1, 1)]["tokens_reused"] == 0
        assert all(r["tokens_reused"] > 0 for ut, r in got.items() if ut != (1, 1))


def daemon_namespace(target, ns):
    with kvstash.Client(target) as c:
        found = [n for n in c.stats()["namespaces"] if n.name == ns]
    assert len(found) == 1, f"namespace {ns} not in the daemon's Stats"
    return found[0]


def test_codec_none_reproduces_the_full_recompute(unix_target, tmp_path):
    ns = kvs.ns_name("chat-none")
    rc, s = run_example(tmp_path, unix_target, ns, "none", "cold")
    check_reuse(s)
    assert s["data_paths"] == ["shm"], s["data_paths"]
    # Both paths attend over the same fp16 KV in fp32 compute; only the matmuls' shapes
    # differ, so the logits agree to rounding of fp32 accumulation: chat_reuse.TOLERANCE.
    tol = chat.TOLERANCE["fp32"]
    assert s["tolerance_rel"] == tol
    for r in s["turns"]:
        assert r["match"], f"next token differs from the recompute: {r}"
        assert r["max_rel_err"] <= tol, f"logits off by {r['max_rel_err']:.3g} relative: {r}"
    assert s["ok"] and rc == 0
    blocks = sum(w[3] for w in expected_turns().values())
    assert s["totals"]["blocks_put"] == blocks == s["namespace_blocks"]
    n = daemon_namespace(unix_target, ns)
    assert n.blocks == blocks and n.raw_bytes == blocks * n.block_bytes
    assert (n.layers, n.kv_heads, n.head_dim, n.dtype, n.key_codec) == (
        chat.MODELS["tiny"].layers, chat.MODELS["tiny"].kv_heads, chat.MODELS["tiny"].head_dim,
        "fp16", "none")

    # A second run (a restarted worker) against the same namespace finds every prompt's
    # blocks already there, from the first turn on, and stores nothing new. It restores
    # through host arrays (no get_prefix out=), which must give the same numbers.
    rc, s = run_example(tmp_path, unix_target, ns, "none", "warm", restore="host")
    check_reuse(s, warm=True)
    assert s["namespace_blocks_before"] == blocks == s["namespace_blocks"]
    assert all(r["match"] and r["max_rel_err"] <= tol for r in s["turns"]) and rc == 0
    assert daemon_namespace(unix_target, ns).blocks == blocks


def test_lossy_codec_is_restored_and_reported(module_daemon, tmp_path):
    target = module_daemon(host_capacity="256M").target  # TCP: no shared memory
    ns = kvs.ns_name("chat-kivi4")
    rc, s = run_example(tmp_path, target, ns, "kivi-4", "kivi4")
    check_reuse(s)
    assert s["data_paths"] == ["grpc"], s["data_paths"]
    assert rc == 0, "a lossy codec's differences are reported, never an error"
    for r in s["turns"]:
        if r["tokens_reused"]:
            # Non-zero: the logits really came from the decoded blocks, not a recompute.
            # Bounded: 4-bit KV moves logits by a few percent at most (measured ~2%).
            assert 0 < r["max_rel_err"] < 0.25, r
        else:  # nothing restored: both paths computed the same thing
            assert r["max_rel_err"] <= chat.TOLERANCE["fp32"] and r["match"], r
    n = daemon_namespace(target, ns)
    blocks = sum(w[3] for w in expected_turns().values())
    assert n.blocks == blocks and n.key_codec == n.value_codec == "kivi-4"
    assert n.stored_bytes < n.raw_bytes / 2, "kivi-4 blocks are stored compressed"

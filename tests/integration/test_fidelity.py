"""tests/bench/ppl/ppl_bench.py (issue 16 item 2), short, against a real daemon: the trained
byte-level model of tests/data/model reads 4 held-out windows of 160 tokens; the first 128
tokens' KV (8 blocks of 16 tokens) goes through kvstash with each codec and back, and the
other 32 are prefilled on top. Codec none must reproduce the locally cached prefix bit for
bit (restored bytes and every logit); each lossy codec must really change the output (KL > 0:
the logits came from decoded blocks) and stay within a generous perplexity bound. RotateKV
(pre-RoPE keys) is calibrated on calib.txt first, SQuat gets each prompt's queries.

The harness runs in this process (its run(), as from the command line), so a failure shows
its table in the captured output. The full table is in tests/bench/RESULTS.md."""
import math
import os
import sys

import pytest

import kvs

torch = pytest.importorskip("torch")
kvs.client_package()
sys.path.insert(0, os.path.join(kvs.REPO, "tests", "bench", "ppl"))
import ppl_bench  # noqa: E402

CALIB = 256
CODECS = ["none", "fp8", "kivi-2", "polarquant", "rotatekv-2", "squat-2"]
# Perplexity increase allowed, relative to the reference: generous, so that only a broken
# path fails (a RoPE off by the prefix length, blocks in the wrong order, a codec decoding
# garbage: each raises it many times over), never the ordinary 2-bit loss. Measured on these
# 4 windows (RESULTS.md): fp8 < 0.1 %, 2-3 bit codecs under 1 %.
MAX_REL = {"fp8": 0.01, "kivi-2": 0.15, "polarquant": 0.15, "rotatekv-2": 0.15,
           "squat-2": 0.15}


@pytest.fixture(scope="module")
def summary(module_daemon):
    d = module_daemon(host_capacity="256M", extra=["--calib-tokens", str(CALIB)])
    args = ppl_bench.parse_args([
        "--target", d.target, "--windows", "4", "--window", "160", "--prefix-blocks", "8",
        "--codecs", ",".join(CODECS), "--calib-tokens", str(CALIB), "--batch", "4"])
    s = ppl_bench.run(args, pb=kvs.pb)
    ppl_bench.report(s)  # shown on failure
    return s


def test_codec_none_is_exact_and_every_codec_bounded(summary):
    s = summary
    assert [r["codec"] for r in s["rows"]] == CODECS
    assert s["codecs_offered"][:1] == ["none"] and set(CODECS) <= set(s["codecs_offered"])
    assert ppl_bench.check(s, max_rel=0.15) == []
    # A trained model: far below the 256 of a uniform guess over bytes.
    assert 1.5 < s["ref_ppl"] < 12, s["ref_ppl"]
    rows = {r["codec"]: r for r in s["rows"]}
    none = rows.pop("none")
    assert none["exact"] and none["ppl"] == s["ref_ppl"] and none["kl"] == 0
    assert none["agree"] == 1.0 and none["attn_out"] == 0 and none["positions"] == 4 * 31
    assert 16 < none["bits"] < 16.1
    for c, r in rows.items():
        assert math.isfinite(r["ppl"]) and r["kl"] > 0, r
        assert abs(r["dppl"]) <= MAX_REL[c] * s["ref_ppl"], r
        assert r["agree"] > 0.8, r
        assert 0 < r["attn_out"] < 0.6, r


def test_rotatekv_and_squat_get_their_state(summary):
    rows = {r["codec"]: r for r in summary["rows"]}
    rk, sq = rows["rotatekv-2"], rows["squat-2"]
    # RotateKV: pre-RoPE keys, channel order frozen (state version 1) by the calibration
    # blocks before any evaluated block; 2 bits + fp16 scale/zero per 128 channels.
    assert rk["keys"] == "pre-RoPE" and rk["state_version"] == 1
    assert 2.25 <= rk["bits"] < 2.4
    # SQuat: the prompt's queries reached the namespace (a state version was published).
    assert sq["queries"] and sq["state_version"] == 1
    assert rows["kivi-2"]["bits"] == sq["bits"]  # SQuat stores a KIVI block
    assert rows["fp8"]["bits"] < 8.1 and rows["polarquant"]["bits"] < 3.95

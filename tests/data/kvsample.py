#!/usr/bin/python3
"""Read, trim and cut `kvsample/1` files (real KV captured from a model; format in
tests/data/README.md) into kvstash blocks.

    kvsample.py info FILE
    kvsample.py trim SRC DST --tokens N        keep the first N tokens of every array
    kvsample.py blocks FILE OUTDIR --block-tokens T [--max-blocks B]
        writes OUTDIR/block-<i>.bin (layout [L][2][t][H][D], fp16) and
        OUTDIR/block-<i>.tokens (the block's token ids, one line, space separated)

Token ids are the text's bytes (the model has a byte-level vocabulary), so the chained
block keys of DESIGN §1 can be derived from them.
Runs on Debian's /usr/bin/python3 with python3-numpy.
"""
import argparse
import json
import os
import sys

import numpy as np

HEADER_BYTES = 4096
MAGIC = b"KVSAMPLE1\n"


def read(path):
    """Returns (meta dict, {name: np.ndarray}) with arrays as float16, row-major."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(MAGIC) or len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: not a kvsample/1 file")
    meta = json.loads(raw[len(MAGIC):HEADER_BYTES].decode("ascii"))
    arrays = {}
    for a in meta["arrays"]:
        if a["dtype"] != "float16":
            raise ValueError(f"{path}: array {a['name']}: dtype {a['dtype']} unsupported")
        count = int(np.prod(a["shape"]))
        end = a["offset"] + 2 * count
        if end > len(raw):
            raise ValueError(f"{path}: array {a['name']} runs past the end of the file")
        arrays[a["name"]] = np.frombuffer(raw, dtype="<f2", count=count,
                                          offset=a["offset"]).reshape(a["shape"])
    return meta, arrays


def token_ids(meta):
    """Token ids of the sample: the bytes of its text (byte-level vocabulary)."""
    text = meta.get("text_bytes")
    if text is None:
        raise ValueError("sample has no text_bytes: token ids unknown")
    ids = [ord(c) for c in text]
    if len(ids) < meta["tokens"] or max(ids, default=0) > 255:
        raise ValueError(f"text_bytes holds {len(ids)} byte tokens, the sample {meta['tokens']}")
    return ids[: meta["tokens"]]


def write(path, meta, arrays):
    """Writes a kvsample/1 file with the given arrays (same header fields as meta)."""
    meta = dict(meta)
    offset = HEADER_BYTES
    descs = []
    for name, arr in arrays.items():
        descs.append({"name": name, "shape": list(arr.shape), "dtype": "float16", "offset": offset})
        offset += arr.size * 2
    meta["arrays"] = descs
    head = MAGIC + json.dumps(meta).encode("ascii")
    if len(head) > HEADER_BYTES - 1:
        raise ValueError("header too long")
    head = head + b" " * (HEADER_BYTES - 1 - len(head)) + b"\n"
    with open(path, "wb") as f:
        f.write(head)
        for arr in arrays.values():
            f.write(np.ascontiguousarray(arr, dtype="<f2").tobytes())


def trim(src, dst, tokens):
    meta, arrays = read(src)
    if tokens > meta["tokens"]:
        raise ValueError(f"{src} has only {meta['tokens']} tokens")
    ids = [ord(c) for c in meta.get("text_bytes", "")][:tokens]
    if len(ids) < tokens:
        raise ValueError(f"{src}: text_bytes covers only {len(ids)} tokens")
    meta["tokens"] = tokens
    meta["text_bytes"] = bytes(ids).decode("latin-1")
    meta.pop("hidden_state_peaks", None)
    write(dst, meta, {k: v[:, :tokens] for k, v in arrays.items()})


def blocks(meta, arrays, block_tokens):
    """Yields (token ids, block bytes) for consecutive blocks; the last may be partial.
    Block layout [L][2][t][H][D]: k[l][i:i+t] then v[l][i:i+t] for each layer."""
    k, v = arrays["k"], arrays["v"]
    ids = token_ids(meta)
    for i in range(0, meta["tokens"], block_tokens):
        j = min(i + block_tokens, meta["tokens"])
        blk = np.stack([k[:, i:j], v[:, i:j]], axis=1)  # [L][2][t][H][D]
        yield ids[i:j], np.ascontiguousarray(blk, dtype="<f2").tobytes()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info")
    p.add_argument("file")
    p = sub.add_parser("trim")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tokens", type=int, required=True)
    p = sub.add_parser("blocks")
    p.add_argument("file")
    p.add_argument("outdir")
    p.add_argument("--block-tokens", type=int, required=True)
    p.add_argument("--max-blocks", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "info":
        meta, arrays = read(a.file)
        m = meta["model"]
        print(f"{a.file}: {meta['tokens']} tokens, layers {m['layers']}, kv_heads {m['kv_heads']}, "
              f"head_dim {m['head_dim']}; arrays " +
              ", ".join(f"{n}{list(x.shape)}" for n, x in arrays.items()))
    elif a.cmd == "trim":
        trim(a.src, a.dst, a.tokens)
    else:
        meta, arrays = read(a.file)
        os.makedirs(a.outdir, exist_ok=True)
        n = 0
        for ids, data in blocks(meta, arrays, a.block_tokens):
            with open(os.path.join(a.outdir, f"block-{n}.bin"), "wb") as f:
                f.write(data)
            with open(os.path.join(a.outdir, f"block-{n}.tokens"), "w") as f:
                f.write(" ".join(map(str, ids)) + "\n")
            n += 1
            if a.max_blocks and n >= a.max_blocks:
                break
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

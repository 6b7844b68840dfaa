"""The data recipe of the perplexity harness's model (issue 16 item 1): which files of this
machine, in which order, split how. Deterministic: the same Debian 12 packages give the same
bytes.

Sources (all present on a Debian 12 machine with python3 installed):
  - every `*.gz` under /usr/share/doc (changelogs, READMEs, NEWS, ...), decompressed;
  - every file in /usr/share/common-licenses;
  - every `*.py` directly in /usr/lib/python3.11 (the standard library's top-level modules).
Each file contributes at most its first CAP bytes (so a few huge changelogs do not dominate);
files holding a NUL byte in that part (binary) are left out. Files are taken in sorted path
order.

Split by file, never inside a file: sha256 of the path (as a string) mod 1000 gives a
bucket; buckets < 20 are HELD-OUT (evaluation), 20..29 CALIBRATION (RotateKV's channel
order, never evaluated, never trained on), the rest TRAIN.

Checked-in products (tests/data/model/, written by `recipe.py write`):
  heldout.txt  WINDOWS_HELDOUT windows of WINDOW bytes, concatenated: from each held-out file
               in order, min(PER_FILE, its capped bytes // WINDOW) windows spread evenly
               over its capped part (the first at its start, the last at its end), until
               there are enough;
  calib.txt    CALIB_BYTES bytes: the calibration files' capped parts, concatenated in order;
  manifest.txt each source file, its split, its bytes used, and sha256 of the train stream.
The training stream (not checked in, rebuilt by train.py from this machine): the train
files' capped parts, concatenated in order, each followed by a 0x0a byte.

    /usr/bin/python3 tests/bench/ppl/recipe.py write tests/data/model
    /usr/bin/python3 tests/bench/ppl/recipe.py stats"""
import glob
import gzip
import hashlib
import os
import sys

CAP = 64 << 10
WINDOW = 512
WINDOWS_HELDOUT = 384          # 192 KiB
PER_FILE = 8
CALIB_BYTES = 32 << 10         # 32 KiB: RotateKV calibrates on 4096 tokens per namespace
HELDOUT, CALIB, TRAIN = "heldout", "calib", "train"


def sources():
    """Sorted paths of every source file."""
    paths = glob.glob("/usr/share/doc/**/*.gz", recursive=True)
    paths += [p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p)]
    paths += glob.glob("/usr/lib/python3.11/*.py")
    # Regular files first, then links, so that a link whose target is a source is the one
    # corpus() skips.
    return sorted(p for p in paths if os.path.isfile(p) and not os.path.islink(p)) + \
        sorted(p for p in paths if os.path.islink(p) and os.path.isfile(p))


def split_of(path):
    b = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little") % 1000
    return HELDOUT if b < 20 else CALIB if b < 30 else TRAIN


def read_capped(path):
    """The file's first CAP bytes (decompressed for .gz), or None when it is binary or
    unreadable."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(CAP)
        else:
            with open(path, "rb") as f:
                data = f.read(CAP)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not data or b"\0" in data:
        return None
    return data


def corpus():
    """[(path, split, bytes)] for every usable source, in order. Symbolic links are
    skipped where their target is itself a source (the same text twice)."""
    out, seen = [], set()
    for p in sources():
        real = os.path.realpath(p)
        if real in seen:
            continue
        seen.add(real)
        data = read_capped(p)
        if data is not None:
            out.append((p, split_of(p), data))
    return out


def train_stream(items=None):
    items = corpus() if items is None else items
    return b"".join(d + b"\n" for _, s, d in items if s == TRAIN)


def heldout_windows(items):
    wins = []
    for _, s, d in items:
        if s != HELDOUT or len(d) < WINDOW:
            continue
        n = min(PER_FILE, len(d) // WINDOW)
        starts = [0] if n == 1 else [i * (len(d) - WINDOW) // (n - 1) for i in range(n)]
        for o in starts:
            wins.append(d[o:o + WINDOW])
            if len(wins) == WINDOWS_HELDOUT:
                return wins
    return wins


def calib_text(items):
    return b"".join(d for _, s, d in items if s == CALIB)[:CALIB_BYTES]


def write(outdir):
    items = corpus()
    os.makedirs(outdir, exist_ok=True)
    wins = heldout_windows(items)
    with open(os.path.join(outdir, "heldout.txt"), "wb") as f:
        f.write(b"".join(wins))
    with open(os.path.join(outdir, "calib.txt"), "wb") as f:
        f.write(calib_text(items))
    train = train_stream(items)
    with open(os.path.join(outdir, "manifest.txt"), "w") as f:
        f.write("# tests/bench/ppl/recipe.py: split, bytes used (first %d), path\n" % CAP)
        f.write("# train stream: %d bytes, sha256 %s\n" % (len(train),
                                                          hashlib.sha256(train).hexdigest()))
        for p, s, d in items:
            f.write(f"{s}\t{len(d)}\t{p}\n")
    print(f"heldout {len(wins)} windows of {WINDOW} bytes, calib {len(calib_text(items))} "
          f"bytes, train {len(train)} bytes from {sum(s == TRAIN for _, s, _ in items)} files")


def stats():
    items = corpus()
    for sp in (TRAIN, CALIB, HELDOUT):
        sel = [d for _, s, d in items if s == sp]
        print(f"{sp}: {len(sel)} files, {sum(map(len, sel))} bytes")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "stats":
        stats()
    else:
        sys.exit(__doc__)

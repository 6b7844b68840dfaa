#!/usr/bin/python3
"""ctest deploy.systemd: the systemd unit as `cmake --install` installs it.

  check_systemd.py BUILD_DIR KVSTASHD [--self-test]

1. `cmake --install BUILD_DIR --prefix TMP`: the unit lands in TMP/lib/systemd/system with
   ExecStart rewritten to TMP/bin/kvstashd.
2. `systemd-analyze verify` on that copy: systemd's own parser. It exits 0 on an unknown
   key or a value it cannot parse (it only warns), so any line it prints about the unit
   fails the check too.
3. What the unit promises about the daemon, checked against the daemon: Type=notify with
   NotifyAccess=main and a watchdog (the protocol itself: tests/integration/test_metrics.py
   test_sd_notify_*); ExecStart's command line, specifiers resolved, parses (kvstashd
   --print-config) and puts the disk tier in the StateDirectory and reads the config from
   the ConfigurationDirectory; TimeoutStopSec exceeds that config's drain_timeout with
   room for the flush at exit; the exit code kvstashd gives a bad flag or config file is
   in RestartPreventExitStatus and 1 (a failed start) is not; the hardening DESIGN §12
   asks for is present.
--self-test breaks copies of the unit and asserts each break is caught.
Exit 77 (skipped) without systemd-analyze.
"""
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

UNIT_NAME = "kvstashd.service"


def parse_unit(text):
    """{section: {key: [values]}} (systemd's syntax: comments, continuations, repeats)."""
    out, sec, buf = {}, None, ""
    for raw in text.splitlines():
        line = buf + raw.strip()
        buf = ""
        if line.endswith("\\"):
            buf = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            sec = line[1:-1]
            out.setdefault(sec, {})
            continue
        k, _, v = line.partition("=")
        out.setdefault(sec, {}).setdefault(k.strip(), []).append(v.strip())
    return out


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "": 1, "m": 60, "min": 60, "h": 3600,
          "hr": 3600}


def seconds(v):
    """A systemd time span ("30", "150s", "10min", "2min 30s") in seconds; None if bad."""
    if v in ("infinity",):
        return float("inf")
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", v):
        if m.start() != pos or m.group(2) not in _UNITS:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(v) and v.strip() else None


def one(unit, sec, key):
    vals = unit.get(sec, {}).get(key, [])
    return vals[-1] if vals else None


def analyze(unit_path):
    """systemd-analyze verify: (ok, output)."""
    r = subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(unit_path))
    out = (r.stdout + r.stderr).strip()
    about_unit = [ln for ln in out.splitlines()
                  if UNIT_NAME in ln or os.path.basename(unit_path) in ln]
    return r.returncode == 0 and not about_unit, out


def check_unit(f, unit_path, prefix, kvstashd_installed, kvstashd):
    ok, out = analyze(unit_path)
    f.check(ok, f"systemd-analyze verify {unit_path}: {out or '(exit status)'}")
    with open(unit_path) as fh:
        u = parse_unit(fh.read())
    svc = u.get("Service", {})
    f.check(one(u, "Service", "Type") == "notify", "Type= must be notify (kvstashd sends READY=1)")
    f.check(one(u, "Service", "NotifyAccess") == "main",
            "NotifyAccess=main: kvstashd's main process sends every notification")
    wd = seconds(one(u, "Service", "WatchdogSec") or "")
    f.check(wd is not None and 2 <= wd < float("inf"),
            f"WatchdogSec= must be a time of at least 2 s (got {one(u, 'Service', 'WatchdogSec')})")
    ts = seconds(one(u, "Service", "TimeoutStartSec") or "")
    f.check(ts is not None and ts >= 60,
            "TimeoutStartSec= of at least 60 s: the disk tier is indexed before READY=1")
    f.check(one(u, "Service", "Restart") == "on-failure", "Restart=on-failure")
    f.check("HUP" in (one(u, "Service", "ExecReload") or ""), "ExecReload= sends SIGHUP")
    f.check("multi-user.target" in " ".join(u.get("Install", {}).get("WantedBy", [])),
            "[Install] WantedBy=multi-user.target")
    for key, want in (("DevicePolicy", "closed"), ("ProtectSystem", "strict"),
                      ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes")):
        f.check(one(u, "Service", key) == want, f"hardening: {key}={want}")
    f.check(any(v.startswith("char-nvidia") or v.startswith("/dev/nvidia")
                for v in svc.get("DeviceAllow", [])),
            "DeviceAllow= must let the GPU's devices through (DevicePolicy=closed)")
    f.check(one(u, "Service", "DynamicUser") == "yes" or one(u, "Service", "User"),
            "a dynamic or dedicated user (DynamicUser= or User=)")
    state = one(u, "Service", "StateDirectory")
    conf = one(u, "Service", "ConfigurationDirectory")
    f.check(state and conf, "StateDirectory= and ConfigurationDirectory= are set")

    # ExecStart: the installed binary, and a command line kvstashd accepts.
    argv = (one(u, "Service", "ExecStart") or "").split()
    f.check(argv and argv[0] == kvstashd_installed,
            f"ExecStart= runs {argv[:1]}, not the installed {kvstashd_installed}")
    etc, varlib = os.path.join(prefix, "etc"), os.path.join(prefix, "var", "lib")
    argv = [a.replace("%E", etc).replace("%S", varlib) for a in argv]
    if "--config" in argv:
        cfg = argv[argv.index("--config") + 1]
        f.check(conf and cfg.startswith(os.path.join(etc, conf) + "/"),
                f"--config {cfg} is not in the ConfigurationDirectory ({conf})")
        os.makedirs(os.path.dirname(cfg), exist_ok=True)
        shutil.copy(os.path.join(prefix, "share", "kvstash", "kvstashd.yaml"), cfg)
    rc, pc, err = dl.print_config(kvstashd, argv[1:])
    if not f.check(rc == 0, f"ExecStart's arguments refused by kvstashd: {err.strip()}"):
        return
    data_dir = pc["data_dir"][0]
    f.check(state and data_dir == os.path.join(varlib, state),
            f"the disk tier ({data_dir}) is not the StateDirectory ({state})")
    drain = int(pc["drain_timeout"][0])
    stop = seconds(one(u, "Service", "TimeoutStopSec") or "")
    f.check(stop is not None and stop >= drain + 30,
            f"TimeoutStopSec ({stop}) must exceed drain_timeout ({drain} s) by at least 30 s "
            "for the flush at exit")

    # Exit codes: a usage error must not be retried forever, a failed start must be.
    prevent = " ".join(svc.get("RestartPreventExitStatus", [])).split()
    bad = subprocess.run([kvstashd, "--no-such-flag"], capture_output=True, timeout=30)
    f.check(str(bad.returncode) in prevent,
            f"kvstashd exits {bad.returncode} on a bad flag: not in RestartPreventExitStatus "
            f"{prevent} (systemd would restart it forever)")
    badcfg = os.path.join(prefix, "bad.yaml")
    with open(badcfg, "w") as fh:
        fh.write("host_capacity: 12X\n")
    bad = subprocess.run([kvstashd, "--config", badcfg], capture_output=True, timeout=30)
    f.check(str(bad.returncode) in prevent,
            f"kvstashd exits {bad.returncode} on a bad config file: not in "
            f"RestartPreventExitStatus {prevent}")
    f.check("1" not in prevent, "exit 1 (a start that failed) must stay restartable")


def self_test(unit_path, prefix, installed, kvstashd):
    """Each mutation must make check_unit fail."""
    with open(unit_path) as fh:
        good = fh.read()
    mutations = {
        "misspelled key": ("ProtectSystem=strict", "ProtectSytem=strict"),
        "unparsable watchdog": ("WatchdogSec=30", "WatchdogSec=30 seconds"),
        "stop timeout below the drain": ("TimeoutStopSec=150", "TimeoutStopSec=20"),
        "unknown flag in ExecStart": ("--data-dir %S", "--data-dri %S"),
        "disk tier outside the StateDirectory": ("--data-dir %S/kvstash", "--data-dir /srv/kvs"),
        "usage errors restarted": ("RestartPreventExitStatus=2", "RestartPreventExitStatus=3"),
        "simple instead of notify": ("Type=notify", "Type=simple"),
    }
    failures = []
    for name, (old, new) in mutations.items():
        # Only in a directive, never in a comment.
        pat = re.compile(r"^([^#;\n]*)" + re.escape(old), re.M)
        if not pat.search(good):
            failures.append(f"self-test '{name}': '{old}' not in the unit")
            continue
        bad = os.path.join(prefix, "mut", UNIT_NAME)
        os.makedirs(os.path.dirname(bad), exist_ok=True)
        with open(bad, "w") as fh:
            fh.write(pat.sub(lambda m: m.group(1) + new, good, count=1))
        f = dl.Failures("mutant")
        check_unit(f, bad, prefix, installed, kvstashd)
        if not f.msgs:
            failures.append(f"self-test '{name}': not caught")
    for m in failures:
        print("FAIL", m)
    print(f"deploy.systemd self-test: {len(mutations) - len(failures)} passed, "
          f"{len(failures)} failed")
    return 1 if failures else 0


def main():
    build, kvstashd = sys.argv[1], sys.argv[2]
    dl.need_tool("systemd-analyze", "systemd")
    prefix = dl.tmpdir("kvs-systemd-")
    try:
        r = subprocess.run(["cmake", "--install", build, "--prefix", prefix],
                           capture_output=True, text=True, timeout=300)
        if r.returncode:
            print(r.stdout, r.stderr)
            return 1
        unit = os.path.join(prefix, "lib", "systemd", "system", UNIT_NAME)
        installed = os.path.join(prefix, "bin", "kvstashd")
        f = dl.Failures("deploy.systemd")
        if f.check(os.path.exists(unit), f"cmake --install did not install {unit}"):
            check_unit(f, unit, prefix, installed, kvstashd)
        rc = f.report()
        if "--self-test" in sys.argv and os.path.exists(unit):
            rc |= self_test(unit, prefix, installed, kvstashd)
        return rc
    finally:
        dl.rmtree(prefix)


if __name__ == "__main__":
    sys.exit(main())

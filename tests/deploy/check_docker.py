#!/usr/bin/python3
"""ctest deploy.docker and deploy.docker_build: the container recipe (deploy/docker).

No container engine runs on CI (and hadolint is in neither Debian nor npm), so:

  check_docker.py lint KVSTASHD KVCTL LIBKVSTASH [--self-test]
      Parses deploy/docker/Dockerfile and checks it against the daemon and this machine:
      multi-stage with named, tagged bases; the build stage runs deploy/docker/build.sh and
      installs a Debian package for every pkg-config module CMakeLists.txt needs (dpkg -S
      on this Debian 12 machine, the image's base); the runtime stage installs exactly the
      packages that own the libraries the built kvstashd, kvctl and libkvstash load
      (readelf NEEDED, dpkg -S) and no -dev package; a numeric non-root USER; EXPOSE =
      the ports of the image's kvstashd.yaml, which kvstashd accepts (--print-config) and
      which listens beyond loopback; HEALTHCHECK runs the healthcheck script on the
      metrics port; VOLUMEs hold the config, the disk tier and the region socket; the
      config file is COPY'd where CMD's --config reads it; COPY sources exist; apt
      hygiene (--no-install-recommends, lists removed in the same layer). --self-test
      breaks copies of the Dockerfile and expects each break to be caught.
  check_docker.py build SRC_DIR
      Runs deploy/docker/build.sh (the build stage's RUN) into a temporary prefix (CPU
      only unless KVS_TEST_DOCKER_CUDA=ON: nvcc is slow and the CUDA half of the recipe is
      the toolkit's), checks the runtime package list against the binaries it built,
      starts the built kvstashd on the image's config (ports and paths moved to free
      ones) and runs the HEALTHCHECK script against it: 0 while it serves, non-zero
      against a port nothing listens on.
"""
import functools
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

DOCKER = os.path.join(dl.DEPLOY, "docker")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
# Packages every Debian image has and the check does not ask the Dockerfile to list.
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6"}


# ------------------------------------------------------------------ parsing

def parse_dockerfile(text):
    """[(stage index, instruction, argument string)], continuations joined, comments
    dropped; and the ARG defaults before the first FROM."""
    out, args, stage, buf = [], {}, -1, ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        line, buf = buf + s, ""
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stage += 1
        if instr == "ARG" and stage < 0:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        out.append((stage, instr, rest.strip()))
    return out, args


def subst(s, args):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)


def exec_form(rest):
    """A JSON-array (exec form) argument as a list, else the shell form split."""
    rest = rest.strip()
    if rest.startswith("["):
        import json
        return json.loads(rest)
    return shlex.split(rest)


def apt_packages(run):
    """Packages of every `apt-get install` in a RUN's shell text (quoted names with $(...)
    kept as written)."""
    pkgs = []
    for m in re.finditer(r"apt-get install (.*?)(?=&&|\|\||;|$)", run):
        for w in shlex.split(m.group(1)):
            if not w.startswith("-"):
                pkgs.append(w)
    return pkgs


# ------------------------------------------------------------------ this machine's view

@functools.lru_cache(maxsize=None)
def needed_libs(elf):
    r = subprocess.run(["readelf", "-d", elf], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)


@functools.lru_cache(maxsize=None)
def lib_path(soname):
    """Where the dynamic linker finds soname (ldconfig -p, this machine's word size)."""
    r = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, check=True)
    found = [m.group(3) for m in (re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", ln)
                                  for ln in r.stdout.splitlines())
             if m and m.group(1) == soname and ("x86-64" in m.group(2) or "64" not in r.stdout)]
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def owner(path):
    """The Debian package owning path (dpkg -S, following /lib -> /usr/lib), or None."""
    for p in (path, os.path.realpath(path), path.replace("/usr/lib/", "/lib/"),
              path.replace("/lib/", "/usr/lib/", 1)):
        r = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":")[0].strip()
    return None


def runtime_packages(elves):
    """{package: [sonames]} owning what the ELF files load directly; unknown sonames
    (ours, CUDA's) under None."""
    own = {}
    ours = {os.path.basename(e) for e in elves}
    for e in elves:
        for so in needed_libs(e):
            if so in ours or so.startswith("libkvstash"):
                continue
            p = lib_path(so)
            pkg = owner(p) if p else None
            own.setdefault(pkg, []).append(so)
    return own


@functools.lru_cache(maxsize=None)
def pkgconfig_modules():
    """pkg-config modules of pkg_check_modules() in the build's CMakeLists (tests/ aside:
    BUILD_TESTING=OFF in the image)."""
    mods = set()
    for root, dirs, files in os.walk(dl.REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".", "build")) and d != "tests"]
        if "CMakeLists.txt" in files:
            with open(os.path.join(root, "CMakeLists.txt")) as f:
                for m in re.finditer(r"pkg_check_modules\(\s*\w+\s+(.*?)\)", f.read(), re.S):
                    ws = m.group(1).split()
                    mods.update(w for w in ws if w not in ("REQUIRED", "QUIET", "IMPORTED_TARGET")
                                and not w.startswith("$"))
    return mods


# ------------------------------------------------------------------ the checks

def check_dockerfile(f, text, elves, kvstashd):
    ins, args = parse_dockerfile(text)
    froms = [(s, r) for s, i, r in ins if i == "FROM"]
    f.check(len(froms) >= 2, "multi-stage: a build stage and a runtime stage")
    names = []
    for s, r in froms:
        m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", r, re.I)
        if not f.check(m, f"FROM {r}: every stage is named (FROM IMAGE AS NAME)"):
            names.append(None)
            continue
        image = subst(m.group(1), args)
        names.append(m.group(2))
        f.check(":" in image.split("/")[-1] and not image.endswith(":latest"),
                f"FROM {image}: pin a tag, never latest or none")
    last = len(froms) - 1
    build_runs = " ".join(r for s, i, r in ins if i == "RUN" and s < last)
    final = [(i, r) for s, i, r in ins if s == last]
    final_runs = " ".join(r for i, r in final if i == "RUN")
    f.check("deploy/docker/build.sh" in build_runs,
            "the build stage runs deploy/docker/build.sh (what ctest deploy.docker_build runs)")

    for s, i, r in ins:
        if i == "RUN" and "apt-get install" in r:
            f.check("--no-install-recommends" in r, f"apt-get install without "
                    f"--no-install-recommends (stage {s})")
            f.check("rm -rf /var/lib/apt/lists" in r, f"apt lists not removed in the layer "
                    f"that fetched them (stage {s})")
        if i == "COPY":
            words = r.split()
            frm = [w for w in words if w.startswith("--from=")]
            srcs = [w for w in words[:-1] if not w.startswith("--")]
            if frm:
                f.check(frm[0][7:] in names[:s], f"COPY {frm[0]}: no earlier stage of that name")
            else:
                for src in srcs:
                    f.check(os.path.exists(os.path.join(dl.REPO, src)),
                            f"COPY {src}: not in the build context (the repository root)")

    # Build packages: one per pkg-config module the build needs, and the proto compiler.
    build_pkgs = set(apt_packages(build_runs))
    for mod in sorted(pkgconfig_modules()):
        r = subprocess.run(["pkg-config", "--path", mod], capture_output=True, text=True)
        pkg = owner(r.stdout.strip()) if r.returncode == 0 else None
        f.check(pkg in build_pkgs, f"build stage: pkg-config module {mod} ({pkg}) not installed")
    for tool in ("protoc-c", "cmake", "pkg-config"):
        path = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                              text=True).stdout.strip()
        pkg = owner(os.path.realpath(path)) if path else None
        f.check(pkg in build_pkgs or tool in build_pkgs,
                f"build stage: {tool} ({pkg}) not installed")

    # Runtime packages: exactly what the binaries load.
    rt = set(apt_packages(final_runs))
    f.check(not [p for p in rt if p.endswith("-dev")],
            f"runtime stage installs -dev packages: {sorted(p for p in rt if p.endswith('-dev'))}")
    own = runtime_packages(elves)
    unknown = own.pop(None, [])
    f.check(all(so.startswith("libcudart") for so in unknown),
            f"libraries no Debian package owns: {unknown}")
    want = set(own) - BASE_PACKAGES
    f.check(want <= rt, f"runtime stage lacks {sorted(want - rt)} (loaded by "
            f"{sorted(so for p in want - rt for so in own[p])})")
    f.check(rt <= want, f"runtime stage installs {sorted(rt - want)}, which nothing loads")
    if any(so.startswith("libcudart") for so in unknown):
        f.check("libcudart" in build_runs, "kvstashd loads libcudart: copy it into the image")

    # The final stage: user, ports, health, volumes, config.
    def last_of(instr):
        v = [r for i, r in final if i == instr]
        return v[-1] if v else None
    user = last_of("USER") or ""
    uid = user.split(":")[0]
    f.check(uid.isdigit() and uid != "0",
            f"USER {user!r}: a numeric non-root uid (Kubernetes' runAsNonRoot checks numbers)")
    cmd = exec_form(last_of("ENTRYPOINT") or "[]") + exec_form(last_of("CMD") or "[]")
    if not f.check("--config" in cmd, f"ENTRYPOINT/CMD {cmd} names no --config"):
        return
    cfg_path = cmd[cmd.index("--config") + 1]
    copies = {r.split()[-1]: r.split()[-2] for i, r in final if i == "COPY" and "--from" not in r}
    src = copies.get(cfg_path)
    if not f.check(src, f"nothing is COPY'd to {cfg_path} (--config)"):
        return
    rc, pc, err = dl.print_config(kvstashd, ["--config", os.path.join(dl.REPO, src)])
    if not f.check(rc == 0, f"{src} refused by kvstashd: {err.strip()}"):
        return
    listen, metrics = pc["listen"][0], pc["metrics_listen"][0]
    f.check(dl.host_of(listen) in ("0.0.0.0", "::"),
            f"listen {listen}: loopback inside a container is unreachable")
    f.check(dl.host_of(metrics) in ("0.0.0.0", "::"),
            f"metrics_listen {metrics}: the health check and scrapers need it reachable")
    exposed = {int(p.split("/")[0]) for r in (r for i, r in final if i == "EXPOSE")
               for p in r.split()}
    f.check(exposed == {dl.port_of(listen), dl.port_of(metrics)},
            f"EXPOSE {sorted(exposed)} != the config's ports {dl.port_of(listen)}, "
            f"{dl.port_of(metrics)}")
    hc = last_of("HEALTHCHECK") or ""
    m = re.search(r"CMD\s+(.*)$", hc)
    hcmd = exec_form(m.group(1)) if m else []
    hc_dest = [d for d, s in copies.items() if s == "deploy/docker/healthcheck.sh"]
    f.check(hcmd and hc_dest and os.path.basename(hc_dest[0]) == hcmd[0],
            f"HEALTHCHECK {hcmd}: not the healthcheck script COPY'd into the image")
    f.check(hcmd[1:] == [str(dl.port_of(metrics))],
            f"HEALTHCHECK {hcmd} does not probe metrics_listen's port {dl.port_of(metrics)}")
    with open(os.path.join(DOCKER, "healthcheck.sh")) as fh:
        f.check("/healthz" in fh.read(), "the healthcheck script does not ask /healthz")
    vols = []
    for i, r in final:
        if i == "VOLUME":
            vols += exec_form(r)
    need = {"config": os.path.dirname(cfg_path), "data_dir": pc["data_dir"][0],
            "region_socket": os.path.dirname(pc["region_socket"][0])}
    for what, path in need.items():
        f.check(path in vols, f"VOLUME {vols} lacks {path} ({what})")
    f.check("compute" in " ".join(r for i, r in final if i == "ENV"),
            "ENV NVIDIA_DRIVER_CAPABILITIES with compute (the container toolkit's libcuda)")


def lint(kvstashd, elves, self_test):
    with open(DOCKERFILE) as fh:
        text = fh.read()
    f = dl.Failures("deploy.docker")
    check_dockerfile(f, text, elves, kvstashd)
    rc = f.report()
    if not self_test:
        return rc
    mutations = {
        "root user": ("USER 10001:10001", "USER root"),
        "port drift": ("EXPOSE 50051 9464", "EXPOSE 50051 9090"),
        "health check on the wrong port": ('"kvstash-healthcheck", "9464"',
                                           '"kvstash-healthcheck", "9465"'),
        "runtime library missing": ("libcyaml1 \\", "\\"),
        "extra runtime package": ("libsystemd0 \\", "libsystemd0 curl \\"),
        "dev package at run time": ("libuv1 liblmdb0", "libuv1-dev liblmdb0"),
        "build dependency missing": ("libmicrohttpd-dev libsystemd-dev", "libsystemd-dev"),
        "config copied elsewhere": ("/etc/kvstash/kvstashd.yaml\nRUN",
                                    "/etc/kvstash/config.yaml\nRUN"),
        "latest tag": ("ARG BASE=debian:12-slim", "ARG BASE=debian:latest"),
        "data volume dropped": ('"/var/lib/kvstash", ', ""),
        "stage name typo": ("COPY --from=build", "COPY --from=builder"),
        "build script bypassed": ("/src/deploy/docker/build.sh /src", "cmake -S /src"),
    }
    bad = 0
    for name, (old, new) in mutations.items():
        if old not in text:
            print(f"FAIL self-test '{name}': {old!r} not in the Dockerfile")
            bad += 1
            continue
        m = dl.Failures("mutant")
        check_dockerfile(m, text.replace(old, new, 1), elves, kvstashd)
        if not m.msgs:
            print(f"FAIL self-test '{name}': not caught")
            bad += 1
    print(f"deploy.docker self-test: {len(mutations) - bad} passed, {bad} failed")
    return rc | (1 if bad else 0)


def build(src):
    work = dl.tmpdir("kvs-docker-")
    f = dl.Failures("deploy.docker_build")
    try:
        prefix = os.path.join(work, "opt")
        env = dict(os.environ, KVS_CUDA=os.environ.get("KVS_TEST_DOCKER_CUDA", "OFF"),
                   JOBS=os.environ.get("JOBS", "2"))
        env.pop("CUDACXX", None)
        r = subprocess.run([os.path.join(src, "deploy", "docker", "build.sh"), src,
                            os.path.join(work, "build"), prefix], env=env,
                           capture_output=True, text=True, timeout=1500)
        if not f.check(r.returncode == 0, f"build.sh failed ({r.returncode}):\n"
                       f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"):
            return f.report()
        kvstashd = os.path.join(prefix, "bin", "kvstashd")
        elves = [kvstashd, os.path.join(prefix, "bin", "kvctl"),
                 os.path.join(prefix, "lib", "libkvstash.so.0")]
        for e in elves:
            f.check(os.path.exists(e), f"build.sh did not install {e}")
        # The runtime stage's packages against what this build loads.
        with open(DOCKERFILE) as fh:
            ins, _ = parse_dockerfile(fh.read())
        last = max(s for s, _, _ in ins)
        rt = set(apt_packages(" ".join(r for s, i, r in ins if s == last and i == "RUN")))
        want = set(runtime_packages(elves)) - BASE_PACKAGES - {None}
        f.check(want == rt, f"runtime packages {sorted(rt)} != what the built binaries load "
                f"{sorted(want)}")
        # The built daemon on the image's config; the HEALTHCHECK script against it.
        cfg = os.path.join(work, "kvstashd.yaml")
        mport = dl.free_port()
        with open(os.path.join(DOCKER, "kvstashd.yaml")) as fh:
            text = fh.read()
        moved = {"listen": '"127.0.0.1:0"', "metrics_listen": f'"127.0.0.1:{mport}"',
                 "data_dir": os.path.join(work, "data"),
                 "region_socket": os.path.join(work, "kvstashd.region"),
                 "port_file": os.path.join(work, "port"), "host_capacity": "64M"}
        lines = [ln for ln in text.splitlines() if ln.split(":")[0] not in moved]
        lines += [f"{k}: {v}" for k, v in moved.items()]
        with open(cfg, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        hc = os.path.join(DOCKER, "healthcheck.sh")
        with dl.running_daemon(kvstashd, ["--config", cfg], work, mport):
            r = subprocess.run([hc, str(mport)], capture_output=True, text=True, timeout=30)
            f.check(r.returncode == 0, f"healthcheck on a serving kvstashd: exit {r.returncode} "
                    f"{r.stderr.strip()}")
        r = subprocess.run([hc, str(dl.free_port())], capture_output=True, text=True, timeout=30)
        f.check(r.returncode != 0, "healthcheck passes with nothing listening")
        return f.report()
    finally:
        dl.rmtree(work)


def main():
    if sys.argv[1] == "lint":
        kvstashd, kvctl, lib = sys.argv[2:5]
        return lint(kvstashd, [kvstashd, kvctl, lib], "--self-test" in sys.argv)
    return build(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())

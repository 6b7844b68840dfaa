#!/usr/bin/python3
"""ctest deploy.k8s: the Kubernetes manifests (deploy/k8s) against the daemon.

  check_k8s.py KVSTASHD [--self-test]

No cluster runs on CI, so every manifest is checked for what it relies on:
 1. yamllint -s (deploy/.yamllint) over every YAML file in deploy/.
 2. Each kustomization (base, overlays/*) is rendered by the small renderer below
    (resources, namespace, images, strategic-merge patches: the subset the manifests use;
    any other kustomize field fails the check) and, where `kubectl` or `kustomize` is
    installed, by kustomize itself: both must give the same objects. Every file a
    kustomization names must exist.
 3. Schema: every built-in object against the Kubernetes API's models of Debian's
    python3-kubernetes (the OpenAPI types): unknown or misspelled fields, wrong types,
    missing required fields. ServiceMonitor and PrometheusRule (CRDs): the fields used.
 4. Consistency with the daemon: the ConfigMap's kvstashd.yaml is accepted by
    `kvstashd --config FILE --print-config`; the container ports named grpc and metrics
    are its listen and metrics_listen ports (bound beyond loopback); probes are httpGet
    /healthz (startup, liveness) and /readyz (readiness) on the metrics port; every file
    the config names (tokens, TLS, data_dir, region socket) lies in a mounted volume, the
    files in a Secret or ConfigMap that has them; the disk tier on a writable volume, the
    region socket on a hostPath (workers on the node); the memory limit covers the host
    tier, spill queue and receive budget; the grace period covers preStop + drain_timeout
    + the flush at exit; a GPU is asked for unless gpu: off; runAsUser is the image's
    USER (deploy/docker/Dockerfile); selectors match the pod labels; Service targetPorts,
    the StatefulSet's serviceName (headless), the PDB, the ServiceMonitor's Service and
    port all resolve.
 5. The daemon itself, on that config with its mounts made temporary directories (ports
    moved to free ones): as shipped (empty token Secret) it must refuse to start naming
    token_file; with tokens it must start, every probe path must answer 200 and the
    ServiceMonitor's path must serve the metrics page.
 6. The PrometheusRule: `promtool check rules`, `promtool test rules` with
    tests/deploy/alerts.test.yaml, every metric an alert names exists on that live page
    (or in daemon/metrics.c for the GPU-only families) with the labels it matches on, and
    the `up` alert's job is the scraped Service's name.
--self-test breaks a copy of the manifests in ways an edit could and expects each break
to be caught. Exit 77 (skipped) without yamllint or python3-kubernetes.
"""
import copy
import os
import re
import shutil
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

K8S = os.path.join(dl.DEPLOY, "k8s")
ALERTS_TEST = os.path.join(dl.HERE, "alerts.test.yaml")
# Disk write rate used to size the flush at exit (tests/bench/RESULTS.md, "Disk commits":
# 403 MB/s for 448 KiB blocks, data-synced). A grace period shorter than the flush of a
# full host tier at this rate cuts the flush short.
FLUSH_BYTES_PER_S = 400e6
GiB = 1 << 30


# ------------------------------------------------------------------ rendering

def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key_of(o):
    return (o.get("kind"), o.get("metadata", {}).get("name"))


MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name",
              "volumeMounts": "mountPath", "env": "name", "imagePullSecrets": "name"}


def smp(dst, patch, field=None):
    """Strategic merge of patch into dst (the subset: maps merge, null deletes, lists of
    containers/volumes/mounts/env/ports merge by their key, other lists are replaced)."""
    if isinstance(dst, dict) and isinstance(patch, dict):
        out = dict(dst)
        for k, v in patch.items():
            if k == "$patch":
                raise ValueError(f"$patch: {v} inside an object is not supported here")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = smp(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(dst, list) and isinstance(patch, list):
        mk = MERGE_KEYS.get(field)
        if field == "ports" and all(isinstance(p, dict) for p in dst + patch):
            mk = "containerPort" if any("containerPort" in p for p in dst + patch) else "port"
        if not mk:
            return copy.deepcopy(patch)
        out = [copy.deepcopy(x) for x in dst]
        for item in patch:
            idx = [i for i, x in enumerate(out) if x.get(mk) == item.get(mk)]
            if item.get("$patch") == "delete":
                out = [x for x in out if x.get(mk) != item.get(mk)]
            elif idx:
                out[idx[0]] = smp(out[idx[0]], item, None)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def render(kdir, f):
    """The objects of kustomization kdir, or None (failures recorded)."""
    path = os.path.join(kdir, "kustomization.yaml")
    if not f.check(os.path.exists(path), f"{kdir}: no kustomization.yaml"):
        return None
    k = load_docs(path)[0]
    extra = set(k) - KNOWN_FIELDS
    if not f.check(not extra, f"{path}: fields this renderer does not implement: {sorted(extra)}"):
        return None
    objs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        if os.path.isdir(p):
            sub = render(p, f)
            if sub is None:
                return None
            objs += sub
        elif f.check(os.path.isfile(p), f"{path}: resource {r} does not exist"):
            objs += load_docs(p)
        else:
            return None
    for pt in k.get("patches", []):
        if not f.check(set(pt) == {"path"}, f"{path}: only `patches: - path:` is supported"):
            return None
        p = os.path.join(kdir, pt["path"])
        if not f.check(os.path.isfile(p), f"{path}: patch {pt['path']} does not exist"):
            return None
        for doc in load_docs(p):
            target = [i for i, o in enumerate(objs) if key_of(o) == key_of(doc)]
            if not f.check(target, f"{p}: patches {key_of(doc)}, which no resource defines"):
                return None
            if doc.get("$patch") == "delete":
                del objs[target[0]]
            else:
                objs[target[0]] = smp(objs[target[0]], doc)
    ns = k.get("namespace")
    for o in objs:
        if ns and o.get("kind") != "Namespace":
            o.setdefault("metadata", {})["namespace"] = ns
        for c in containers(o, init=True):
            for im in k.get("images", []):
                name, _, tag = c.get("image", "").partition(":")
                if name == im["name"]:
                    c["image"] = f"{im.get('newName', name)}:{im.get('newTag', tag)}"
    return objs


def kustomize_cmd():
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
        m = re.search(r"Kustomize Version: v(\d+)", r.stdout)
        if m and int(m.group(1)) >= 4:
            return ["kubectl", "kustomize"]
    return None


def normalize(o):
    """For comparing renders: lists of named maps sorted by name."""
    if isinstance(o, dict):
        return {k: normalize(v) for k, v in o.items()}
    if isinstance(o, list):
        items = [normalize(x) for x in o]
        if all(isinstance(x, dict) and "name" in x for x in items):
            items.sort(key=lambda x: str(x["name"]))
        return items
    return o


# ------------------------------------------------------------------ schema

def schema_check(f, obj, where):
    import kubernetes.client as kc
    model = f"V1{obj.get('kind')}"
    if obj.get("kind") in ("ServiceMonitor", "PrometheusRule"):
        return crd_check(f, obj, where)
    if not f.check(hasattr(kc, model), f"{where}: kind {obj.get('kind')} has no API model"):
        return
    want_api = {"DaemonSet": "apps/v1", "StatefulSet": "apps/v1",
                "PodDisruptionBudget": "policy/v1"}.get(obj["kind"], "v1")
    f.check(obj.get("apiVersion") == want_api,
            f"{where}: apiVersion {obj.get('apiVersion')}, not {want_api}")
    walk(f, obj, model, where)
    try:  # required fields and enums: the client's own constructors
        kc.ApiClient()._ApiClient__deserialize(obj, model)
    except (ValueError, TypeError) as e:
        f.fail(f"{where}: {e}")


def walk(f, value, typ, where):
    import kubernetes.client as kc
    if typ.startswith("list["):
        if f.check(isinstance(value, list), f"{where}: a list expected"):
            for i, v in enumerate(value):
                walk(f, v, typ[5:-1], f"{where}[{i}]")
        return
    if typ.startswith("dict("):
        if f.check(isinstance(value, dict), f"{where}: a map expected"):
            vt = typ[5:-1].split(", ", 1)[1]
            for k, v in value.items():
                quantity = where.endswith(("limits", "requests")) and isinstance(v, (int, float))
                if not quantity:
                    walk(f, v, vt, f"{where}.{k}")
        return
    prim = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if typ in prim:
        f.check(isinstance(value, prim[typ]) and not (typ == "int" and isinstance(value, bool)),
                f"{where}: {typ} expected, got {value!r}")
        return
    if typ in ("object", "datetime"):
        return
    cls = getattr(kc, typ)
    if not f.check(isinstance(value, dict), f"{where}: an object ({typ}) expected"):
        return
    rev = {j: (a, cls.openapi_types[a]) for a, j in cls.attribute_map.items()}
    for k, v in value.items():
        if k in ("apiVersion", "kind") and where.count(".") == 0:
            continue
        if f.check(k in rev, f"{where}: unknown field '{k}' in {typ}"):
            walk(f, v, rev[k][1], f"{where}.{k}")


def crd_check(f, o, where):
    spec = o.get("spec", {})
    f.check(o.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: apiVersion")
    if o["kind"] == "ServiceMonitor":
        f.check(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"},
                f"{where}: unknown spec fields {sorted(set(spec))}")
        for ep in spec.get("endpoints", []):
            f.check(set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"},
                    f"{where}: unknown endpoint fields {sorted(ep)}")
    else:
        f.check(set(spec) == {"groups"}, f"{where}: spec must hold groups only")
        for g in spec.get("groups", []):
            f.check(set(g) <= {"name", "rules", "interval"}, f"{where}: group fields {sorted(g)}")
            for r in g.get("rules", []):
                f.check(set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"},
                        f"{where}: rule fields {sorted(r)}")
                f.check("alert" in r and "expr" in r, f"{where}: a rule needs alert and expr")


# ------------------------------------------------------------------ consistency

def containers(o, init=False):
    spec = o.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


def find(objs, kind, name=None):
    return [o for o in objs if o.get("kind") == kind
            and (name is None or o["metadata"].get("name") == name)]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def mount_for(container, path):
    """The volumeMount whose mountPath holds path (the longest), or None."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (not best or len(mp) > len(best["mountPath"])):
            best = m
    return best


def volume_files(objs, vol):
    """{file name: content} a configMap or secret volume shows, or None for other kinds."""
    for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
        if key in vol:
            name = vol[key].get("name") or vol[key].get("secretName")
            src = find(objs, kind, name)
            if not src:
                return {} if vol[key].get("optional") else None
            data = dict(src[0].get("data", {}))
            data.update(src[0].get("stringData", {}))
            items = vol[key].get("items")
            if items:
                return {i["path"]: data.get(i["key"]) for i in items}
            return data
    return None


def image_uid():
    with open(os.path.join(dl.DEPLOY, "docker", "Dockerfile")) as fh:
        users = re.findall(r"^USER\s+(\d+)", fh.read(), re.M)
    return int(users[-1]) if users else None


PATH_KEYS = ("token_file", "admin_token_file", "tenant_tokens", "tls_cert", "tls_key",
             "tls_client_ca")


def check_objects(f, objs, kvstashd, label, work):
    """Everything but the render; returns the scraped metrics page (or None)."""
    names = [key_of(o) for o in objs]
    f.check(len(names) == len(set(names)), f"{label}: duplicate objects {names}")
    for o in objs:
        schema_check(f, o, f"{label}:{o.get('kind')}/{o.get('metadata', {}).get('name')}")
    workloads = find(objs, "DaemonSet") + find(objs, "StatefulSet")
    if not f.check(len(workloads) == 1, f"{label}: one kvstashd workload, got {len(workloads)}"):
        return None
    w = workloads[0]
    wl = f"{label}:{w['kind']}/{w['metadata']['name']}"
    pod = w["spec"]["template"]
    plabels = pod["metadata"].get("labels", {})
    f.check(selects(w["spec"]["selector"].get("matchLabels"), plabels),
            f"{wl}: selector does not match the pod template's labels")
    spec = pod["spec"]
    cs = [c for c in spec.get("containers", []) if c["name"] == "kvstashd"]
    if not f.check(cs, f"{wl}: no container named kvstashd"):
        return None
    c = cs[0]
    args = c.get("args", [])
    if not f.check("--config" in args, f"{wl}: kvstashd gets no --config"):
        return None
    cfg_path = args[args.index("--config") + 1]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    m = mount_for(c, cfg_path)
    files = volume_files(objs, vols.get(m["name"], {})) if m else None
    text = (files or {}).get(os.path.relpath(cfg_path, m["mountPath"])) if m else None
    if not f.check(text, f"{wl}: --config {cfg_path} is in no mounted ConfigMap"):
        return None
    cfg = os.path.join(work, "kvstashd.yaml")
    with open(cfg, "w") as fh:
        fh.write(text)
    rc, pc, err = dl.print_config(kvstashd, ["--config", cfg])
    if not f.check(rc == 0, f"{wl}: the ConfigMap's kvstashd.yaml is refused: {err.strip()}"):
        return None
    val = {k: v[0] for k, v in pc.items()}

    # Ports and probes.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for pname, key in (("grpc", "listen"), ("metrics", "metrics_listen")):
        f.check(ports.get(pname) == dl.port_of(val[key]) and ports.get(pname),
                f"{wl}: container port {pname} ({ports.get(pname)}) is not {key}'s "
                f"({val[key]})")
        f.check(dl.host_of(val[key]) in ("0.0.0.0", "::"),
                f"{wl}: {key} {val[key]} is unreachable from the kubelet and the Services")
    probes = {}
    for kind, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                       ("readinessProbe", "/readyz")):
        pr = c.get(kind, {}).get("httpGet")
        if not f.check(pr, f"{wl}: no httpGet {kind}"):
            continue
        port = ports.get(pr["port"], pr["port"])
        f.check(port == ports.get("metrics"),
                f"{wl}: {kind} probes port {pr['port']}, not the metrics port")
        f.check(pr.get("path") == path, f"{wl}: {kind} path {pr.get('path')}, want {path}")
        probes[kind] = pr.get("path")
    st = c.get("startupProbe", {})
    f.check(st.get("periodSeconds", 10) * st.get("failureThreshold", 3) >= 300,
            f"{wl}: the startupProbe allows under 5 min for the disk tier's index rebuild")

    # Stop: preStop, drain, flush.
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    f.check(pre, f"{wl}: no preStop hook")
    pre_s = int(pre[-1]) if pre and "sleep" in pre[0] and pre[-1].isdigit() else 0
    grace = spec.get("terminationGracePeriodSeconds", 30)
    host = dl.size_bytes(val["host_capacity"])
    flush = host / FLUSH_BYTES_PER_S if val["flush_on_exit"] == "on" and val["data_dir"] != "none" else 0
    need = pre_s + int(val["drain_timeout"]) + flush
    f.check(grace > need, f"{wl}: terminationGracePeriodSeconds {grace} <= preStop {pre_s} s + "
            f"drain_timeout {val['drain_timeout']} s + flush of host_capacity {flush:.0f} s")

    # Memory and GPU.
    lim = c.get("resources", {}).get("limits", {})
    spill = dl.size_bytes(val["spill_queue"]) if val["spill_queue"] != "auto" else host // 4
    recv = dl.size_bytes(val["recv_budget"]) if val["recv_budget"] != "auto" else max(host // 4, 64 << 20)
    mem_need = host * 9 // 8 + (spill if val["data_dir"] != "none" else 0) + recv + 2 * GiB
    mem = dl.size_bytes(re.sub(r"([KMGT])i$", r"\1", str(lim.get("memory", "0"))))
    f.check(mem and mem >= mem_need, f"{wl}: memory limit {lim.get('memory')} < host tier x "
            f"1.125 + spill queue + receive budget + 2Gi = {mem_need / GiB:.0f}Gi")
    gpu = val["gpu"] != "off"
    f.check(("nvidia.com/gpu" in lim) == gpu,
            f"{wl}: gpu {val['gpu']} but nvidia.com/gpu limit {lim.get('nvidia.com/gpu')}")

    # Files the config names, in the container's volumes.
    mounts = {}
    for key in PATH_KEYS + ("data_dir", "region_socket"):
        v = val[key]
        if not v or v in ("none", "auto"):
            continue
        m = mount_for(c, os.path.dirname(v) if key == "region_socket" else v)
        if not f.check(m, f"{wl}: {key} {v} lies in no volumeMount"):
            continue
        vol = vols.get(m["name"], {})
        mounts[key] = (m, vol)
        if key in PATH_KEYS:
            files = volume_files(objs, vol)
            f.check(files is not None and os.path.relpath(v, m["mountPath"]) in files,
                    f"{wl}: {key} {v}: volume {m['name']} has no such file")
    if "data_dir" in mounts:
        m, vol = mounts["data_dir"]
        f.check(not m.get("readOnly") and ("hostPath" in vol or "persistentVolumeClaim" in vol
                                           or m["name"] in [t["metadata"]["name"] for t in
                                                            w["spec"].get("volumeClaimTemplates", [])]),
                f"{wl}: data_dir on volume {m['name']}: not a writable hostPath or PVC")
    if "region_socket" in mounts:
        f.check("hostPath" in mounts["region_socket"][1],
                f"{wl}: region socket not on a hostPath: the node's workers cannot reach it")
    for cc in containers(w, init=True):
        for mm in cc.get("volumeMounts", []):
            f.check(mm["name"] in vols or mm["name"] in
                    [t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])],
                    f"{wl}: container {cc['name']} mounts undefined volume {mm['name']}")

    # Security: the image's user, non-root, read-only root.
    psc = spec.get("securityContext", {})
    f.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == image_uid(),
            f"{wl}: runAsUser {psc.get('runAsUser')} is not the image's USER {image_uid()}")
    f.check(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
            f"{wl}: readOnlyRootFilesystem")

    # Services, PDB, ServiceMonitor.
    svcs = find(objs, "Service")
    for s in svcs:
        sl = f"{label}:Service/{s['metadata']['name']}"
        f.check(selects(s["spec"].get("selector"), plabels), f"{sl}: selects no kvstashd pod")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            f.check(tp in ports or tp in ports.values(),
                    f"{sl}: targetPort {tp} is no container port")
    f.check(any(s["spec"].get("clusterIP") == "None" for s in svcs),
            f"{label}: no headless Service for client sharding")
    if w["kind"] == "StatefulSet":
        hs = find(objs, "Service", w["spec"].get("serviceName"))
        f.check(hs and hs[0]["spec"].get("clusterIP") == "None",
                f"{wl}: serviceName {w['spec'].get('serviceName')} is not a headless Service")
    for p in find(objs, "PodDisruptionBudget"):
        f.check(selects(p["spec"]["selector"].get("matchLabels"), plabels),
                f"{label}: PodDisruptionBudget selects no kvstashd pod")
    scraped = None
    for sm in find(objs, "ServiceMonitor"):
        tgt = [s for s in svcs if selects(sm["spec"]["selector"].get("matchLabels"),
                                           s["metadata"].get("labels", {}))]
        if not f.check(len(tgt) == 1, f"{label}: the ServiceMonitor selects {len(tgt)} Services"):
            continue
        scraped = tgt[0]
        for ep in sm["spec"]["endpoints"]:
            sp = [p for p in tgt[0]["spec"]["ports"] if p.get("name") == ep["port"]]
            f.check(sp and ports.get(sp[0].get("targetPort")) == ports.get("metrics"),
                    f"{label}: ServiceMonitor port {ep['port']} is not the metrics port")
            probes["ServiceMonitor"] = ep.get("path", "/metrics")

    # The daemon on this config.
    page = run_daemon(f, objs, c, vols, text, val, probes, work, kvstashd, wl)
    if page is not None:
        for r in find(objs, "PrometheusRule"):
            check_rules(f, r, page, scraped, label, work)
    return page


def run_daemon(f, objs, c, vols, text, val, probes, work, kvstashd, wl):
    """Starts kvstashd as the pod would, mounts made directories; returns /metrics."""
    root = os.path.join(work, "pod")
    shutil.rmtree(root, ignore_errors=True)
    remap = {}
    for m in sorted(c.get("volumeMounts", []), key=lambda m: len(m["mountPath"])):
        d = os.path.join(root, m["name"])
        os.makedirs(d, exist_ok=True)
        remap[m["mountPath"]] = d
        for name, content in (volume_files(objs, vols.get(m["name"], {})) or {}).items():
            with open(os.path.join(d, name), "w") as fh:
                fh.write(content or "")
            os.chmod(os.path.join(d, name), 0o600)

    def moved(p):
        for mp in sorted(remap, key=len, reverse=True):
            if p == mp or p.startswith(mp + "/"):
                return remap[mp] + p[len(mp):]
        return p
    mport = dl.free_port()
    lines = [ln for ln in text.splitlines() if not re.match(r"\s*(listen|metrics_listen|"
             + "|".join(PATH_KEYS) + r"|data_dir|region_socket|port_file)\s*:", ln)]
    lines += ['listen: "127.0.0.1:0"', f'metrics_listen: "127.0.0.1:{mport}"',
              f"port_file: {os.path.join(work, 'port')}"]
    for key in PATH_KEYS + ("data_dir", "region_socket"):
        if val[key] and val[key] not in ("none", "auto"):
            lines.append(f"{key}: {moved(val[key])}")
    cfg = os.path.join(work, "pod.yaml")
    with open(cfg, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    # As shipped: an empty token Secret must keep the daemon from starting.
    token = val["token_file"] and moved(val["token_file"])
    f.check(not token or (os.path.exists(token) and os.path.getsize(token) == 0),
            f"{wl}: token_file's Secret ships a token: keep them out of git (empty in "
            f"secret.yaml, filled in by the operator)")
    if token and os.path.exists(token) and os.path.getsize(token) == 0:
        r = subprocess.run([kvstashd, "--config", cfg, "--gpu", "off"], capture_output=True,
                           text=True, timeout=60)
        f.check(r.returncode != 0 and "token_file" in r.stderr,
                f"{wl}: with the shipped (empty) tokens kvstashd must refuse to start "
                f"naming token_file; it exited {r.returncode}: {r.stderr.strip()[:300]}")
    for key in ("token_file", "admin_token_file"):
        if val[key]:
            with open(moved(val[key]), "w") as fh:
                fh.write(f"test-{key}\n")
    try:
        # No GPU on CI: the engine is the one thing that cannot start here.
        with dl.running_daemon(kvstashd, ["--config", cfg, "--gpu", "off"], work, mport):
            for kind, path in probes.items():
                status, body = dl.http_get(mport, path)
                f.check(status == 200, f"{wl}: {kind} GET {path} answered {status}")
            status, page = dl.http_get(mport, "/metrics")
            return page if status == 200 else None
    except RuntimeError as e:
        f.fail(f"{wl}: kvstashd on the pod's config: {e}")
        return None


def families(page):
    """{family: set of label names} of a metrics page."""
    out = {}
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            out.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", line)
            name = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
            if name not in out:
                name = m.group(1)
            out.setdefault(name, set()).update(re.findall(r"(\w+)=\"", m.group(2) or ""))
    return out


def source_families():
    with open(os.path.join(dl.REPO, "daemon", "metrics.c")) as fh:
        return set(re.findall(r'"(kvstash_[a-z0-9_]+)"', fh.read()))


def check_rules(f, rule, page, scraped, label, work):
    promtool = shutil.which("promtool")
    fams, src = families(page), source_families()
    groups = rule["spec"]["groups"]
    for g in groups:
        for r in g["rules"]:
            where = f"{label}: alert {r.get('alert')}"
            expr = r["expr"]
            for name, sel in re.findall(r"\b(kvstash_[a-z0-9_]+)(\{[^}]*\})?", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                fam = name if name in fams else base
                if fam not in fams:
                    f.check(fam in src and fam not in fams,
                            f"{where}: {name} is not a metric kvstashd exports")
                    continue
                for lname in re.findall(r"(\w+)\s*[=!]~?", sel or ""):
                    f.check(lname in fams[fam] | ({"le"} if name.endswith("_bucket") else set()),
                            f"{where}: {fam} has no label {lname} (has {sorted(fams[fam])})")
            for job in re.findall(r'\bup\{job="([^"]+)"\}', expr):
                f.check(scraped and job == scraped["metadata"]["name"],
                        f"{where}: up{{job=\"{job}\"}}: the ServiceMonitor scrapes Service "
                        f"{scraped and scraped['metadata']['name']} (its job label)")
            f.check(r.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                    f"{where}: severity label")
    if not promtool:
        print("note: promtool not installed (Debian prometheus): rules not compiled")
        return
    rules = os.path.join(work, "kvstash.rules.yaml")
    with open(rules, "w") as fh:
        yaml.safe_dump({"groups": groups}, fh, sort_keys=False)
    r = subprocess.run([promtool, "check", "rules", rules], capture_output=True, text=True)
    f.check(r.returncode == 0, f"{label}: promtool check rules: {r.stdout}{r.stderr}")
    t = os.path.join(work, "alerts.test.yaml")
    with open(ALERTS_TEST) as src_f, open(t, "w") as dst:
        dst.write(src_f.read().replace("RULES_FILE", rules))
    r = subprocess.run([promtool, "test", "rules", t], capture_output=True, text=True,
                       cwd=work)
    f.check(r.returncode == 0, f"{label}: promtool test rules: {r.stdout[-3000:]}{r.stderr}")
    tested = set(re.findall(r"alertname: (\w+)", open(ALERTS_TEST).read()))
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    f.check(alerts <= tested, f"{label}: alerts without a promtool test: {sorted(alerts - tested)}")


# ------------------------------------------------------------------ driver

def kustomizations(root):
    out = []
    for d, _, files in os.walk(root):
        if "kustomization.yaml" in files:
            out.append(d)
    return sorted(out)


def check_tree(root, kvstashd, f, work, lint=True):
    if lint:
        r = subprocess.run(["yamllint", "-s", "-c", os.path.join(dl.DEPLOY, ".yamllint"),
                            os.path.dirname(root)], capture_output=True, text=True)
        f.check(r.returncode == 0, f"yamllint: {r.stdout}{r.stderr}")
    ks = kustomizations(root)
    f.check(len(ks) >= 3, f"{root}: base and two overlays expected, found {ks}")
    kz = kustomize_cmd()
    for kdir in ks:
        label = os.path.relpath(kdir, root)
        objs = render(kdir, f)
        if objs is None:
            continue
        if kz:
            r = subprocess.run(kz + [kdir], capture_output=True, text=True)
            if f.check(r.returncode == 0, f"{label}: {' '.join(kz)}: {r.stderr}"):
                theirs = [d for d in yaml.safe_load_all(r.stdout) if d]
                mine = {key_of(o): normalize(o) for o in objs}
                other = {key_of(o): normalize(o) for o in theirs}
                f.check(mine == other, f"{label}: this renderer and {kz[0]} disagree on "
                        f"{sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))}")
                if mine == other:
                    print(f"note: {label}: {' '.join(kz)} renders the same {len(mine)} objects")
        else:
            print(f"note: {label}: no kustomize >= v4 here (kubectl or kustomize): rendered by "
                  f"this script only")
        d = os.path.join(work, label.replace("/", "_"))
        os.makedirs(d, exist_ok=True)
        check_objects(f, objs, kvstashd, label, d)


MUTATIONS = [
    # (what, file under deploy/k8s, old, new)
    ("misspelled field", "base/daemonset.yaml", "terminationGracePeriodSeconds: 120",
     "terminationGracePeriodSecond: 120"),
    ("wrong type", "base/daemonset.yaml", "periodSeconds: 5", "periodSeconds: \"5\""),
    ("probe path", "base/daemonset.yaml", "path: /readyz", "path: /ready"),
    ("metrics port drift", "base/daemonset.yaml", "containerPort: 9464", "containerPort: 9465"),
    ("config key typo", "base/configmap.yaml", "host_capacity: 16G", "host_capacty: 16G"),
    ("metrics on loopback", "base/configmap.yaml", 'metrics_listen: "0.0.0.0:9464"',
     'metrics_listen: "127.0.0.1:9464"'),
    ("Service selects nothing", "base/services.yaml", "  selector:\n    app.kubernetes.io/name: kvstash\n  ports:\n    - name: grpc\n      port: 50051\n      targetPort: grpc\n---\n# Admin",
     "  selector:\n    app.kubernetes.io/name: kvstsh\n  ports:\n    - name: grpc\n      port: 50051\n      targetPort: grpc\n---\n# Admin"),
    ("missing resource file", "base/kustomization.yaml", "  - pdb.yaml", "  - pdb-v2.yaml"),
    ("grace below the drain", "base/daemonset.yaml", "terminationGracePeriodSeconds: 120",
     "terminationGracePeriodSeconds: 30"),
    ("memory limit too small", "overlays/gpu-nodes/daemonset.yaml", "              memory: 400Gi\n              nvidia",
     "              memory: 200Gi\n              nvidia"),
    ("token file not in the Secret", "base/configmap.yaml", "/etc/kvstash-secrets/admin-token",
     "/etc/kvstash-secrets/admin.token"),
    ("alert on a metric that does not exist", "base/prometheusrule.yaml",
     "increase(kvstash_checksum_failures_total[15m])", "increase(kvstash_checksum_failure_total[15m])"),
    ("alert on a label the family lacks", "base/prometheusrule.yaml", "kvstash_rpc_responses_total{code=~",
     "kvstash_rpc_responses_total{status=~"),
    ("ServiceMonitor port name", "base/servicemonitor.yaml", "- port: metrics", "- port: metric"),
    ("StatefulSet without a headless service", "overlays/storage-nodes/statefulset.yaml",
     "serviceName: kvstash", "serviceName: kvstash-admin"),
    ("runs as root", "base/daemonset.yaml", "runAsUser: 10001\n        runAsGroup",
     "runAsUser: 0\n        runAsGroup"),
    ("no GPU asked for", "base/daemonset.yaml", "              nvidia.com/gpu: 1\n", ""),
    ("disk tier on a read-only mount", "base/daemonset.yaml",
     "            - name: data\n              mountPath: /var/lib/kvstash\n      volumes",
     "            - name: data\n              mountPath: /var/lib/kvstash\n              readOnly: true\n      volumes"),
    ("alert that cannot fire", "base/prometheusrule.yaml", "[5m]))) > 0.5", "[5m]))) > 5"),
    ("tokens shipped filled in", "base/secret.yaml", 'token: ""\n  admin', 'token: "abc"\n  admin'),
]


def self_test(kvstashd, work):
    bad = 0
    for what, rel, old, new in MUTATIONS:
        root = os.path.join(work, "mut", "k8s")
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
        shutil.copytree(K8S, root)
        p = os.path.join(root, rel)
        with open(p) as fh:
            text = fh.read()
        if old not in text:
            print(f"FAIL self-test '{what}': {old!r} not in {rel}")
            bad += 1
            continue
        with open(p, "w") as fh:
            fh.write(text.replace(old, new, 1))
        m = dl.Failures("mutant")
        sub = os.path.join(work, "mutwork")
        shutil.rmtree(sub, ignore_errors=True)
        os.makedirs(sub)
        check_tree(root, kvstashd, m, sub, lint=False)
        if not m.msgs:
            print(f"FAIL self-test '{what}' ({rel}): not caught")
            bad += 1
    print(f"deploy.k8s self-test: {len(MUTATIONS) - bad} passed, {bad} failed")
    return 1 if bad else 0


def main():
    kvstashd = sys.argv[1]
    dl.need_tool("yamllint", "yamllint")
    try:
        import kubernetes.client  # noqa: F401
    except ImportError:
        print("SKIP: python3-kubernetes not installed (deploy/dev.sh test installs it)")
        return dl.SKIP
    work = dl.tmpdir("kvs-k8s-")
    try:
        f = dl.Failures("deploy.k8s")
        check_tree(K8S, kvstashd, f, work)
        rc = f.report()
        if "--self-test" in sys.argv:
            rc |= self_test(kvstashd, work)
        return rc
    finally:
        dl.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())

"""kvstashd --gpu all|LIST (issue 17): one codec engine and GPU tier per device.

Everywhere: a malformed device list is refused naming --gpu. Without a GPU (CI), --gpu all
refuses to start and says why. With one or more GPUs (the GPU machine): --gpu all serves
every visible device (CUDA_VISIBLE_DEVICES decides which), Stats and kvctl stats show one
GPU tier per device whose sum is the GPU tier, Puts land in the GPU tiers and come back
exactly as the GPU decode of a one-device daemon gives them, and a list naming a device
the process cannot see refuses to start naming it. The cross-device data path itself is
tests/gpu/test_multi_gpu.c.
"""
import json
import os
import subprocess

import pytest

import kvs
from test_gpu_tier import ulps
from test_metrics import free_port, scrape, val

L, H, D, T = 2, 4, 128, 16


def start(daemon, extra, env=None):
    """The daemon, or the RuntimeError of a failed start (its stderr is in the message)."""
    try:
        return daemon(extra=extra, env=env)
    except RuntimeError as e:
        return e


def visible_gpus():
    """Devices this process sees: started with --gpu all, the daemon says (0 when none)."""
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                       capture_output=True, text=True) if _has("nvidia-smi") else None
    return len(r.stdout.splitlines()) if r and r.returncode == 0 else 0


def _has(tool):
    return any(os.access(os.path.join(p, tool), os.X_OK)
               for p in os.environ.get("PATH", "").split(os.pathsep))


@pytest.mark.parametrize("bad", ["0,,1", "1,1", "32", "gpu0", "0,"])
def test_a_malformed_device_list_is_refused_naming_the_flag(daemon, bad):
    e = start(daemon, ["--gpu", bad])
    assert isinstance(e, RuntimeError), f"--gpu {bad} started"
    assert "--gpu" in str(e) and "list of device" in str(e), str(e)


def test_gpu_all_serves_every_visible_device(daemon, tmp_path):
    port = free_port()
    d = start(daemon, ["--gpu", "all", "--gpu-capacity", "128M",
                       "--metrics-listen", f"127.0.0.1:{port}"])
    if isinstance(d, RuntimeError):
        # No GPU here (CI): the start fails, saying which flag and why.
        assert visible_gpus() == 0, f"--gpu all failed with GPUs present: {d}"
        assert "--gpu all" in str(d) or "--gpu: device" in str(d), str(d)
        return
    st = d.stats()
    devices = list(st.gpu_devices)
    assert len(devices) >= 1
    gpu = [t for t in st.tiers if t.tier == kvs.pb.TIER_GPU][0]
    assert gpu.capacity_bytes == sum(x.capacity_bytes for x in devices)
    assert [x.device for x in devices] == list(range(len(devices)))
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, key_codec="kivi-4",
                            value_codec="kivi-4"))
    blocks = {}
    for i in range(4 * len(devices)):
        data = ns.payload(T, seed=100 + i)
        r = kvs.put(d.stub, ns.name, b"k%d" % i, T, data)
        assert r.tier == kvs.pb.TIER_GPU
        blocks[b"k%d" % i] = data
    st = d.stats()
    per_dev = [x.blocks for x in st.gpu_devices]
    assert sum(per_dev) == len(blocks)
    assert min(per_dev) >= 1, f"blocks not spread over the devices: {per_dev}"
    # Each block decoded by its device's engine equals the client's CPU decode of the
    # encoded block within one fp16 ulp (test_gpu_tier's rule), on every device.
    for key in blocks:
        got = kvs.get(d.stub, ns.name, key)
        out = tmp_path / "local.bin"
        r = d.kvctl("get", ns.name, key.decode(), out, "--local")
        assert r.returncode == 0, r.stderr
        assert len(got.data) == len(blocks[key])
        assert ulps(out.read_bytes(), got.data) <= 1, key
    r = d.kvctl("--json", "stats")
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert [g["blocks"] for g in js["gpu_devices"]] == per_dev
    # The metrics: one series per device, summing to the GPU tier's.
    _, m = scrape(port)
    assert [val(m, "kvstash_gpu_tier_blocks", device=str(i))
            for i in range(len(per_dev))] == per_dev
    assert val(m, "kvstash_tier_blocks", tier="gpu") == sum(per_dev)


def test_a_device_the_process_cannot_see_is_refused(daemon):
    n = visible_gpus()
    if n == 0:
        pytest.skip("no GPU here: --gpu lists cannot start")
    e = start(daemon, ["--gpu", "0,%d" % n])
    assert isinstance(e, RuntimeError), "a list with an invisible device started"
    assert "--gpu: device %d" % n in str(e), str(e)
    # CUDA_VISIBLE_DEVICES hides every device: --gpu all has none to serve.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    e = start(daemon, ["--gpu", "all"], env=env)
    assert isinstance(e, RuntimeError), "--gpu all started with no visible device"
    assert "--gpu all" in str(e), str(e)
    # Only device 0 visible: one engine, one GPU tier.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    d = start(daemon, ["--gpu", "all", "--gpu-capacity", "64M"], env=env)
    assert not isinstance(d, RuntimeError), str(d)
    assert len(d.stats().gpu_devices) == 1

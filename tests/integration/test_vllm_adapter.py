"""kvstash.integrations.vllm.KvstashConnector against a real daemon, driven as vLLM drives a KV
connector (no vLLM here): a scheduler-side and a worker-side instance, the scheduler methods
in the order vLLM's scheduler calls them, the metadata pickled across as between processes,
and per step start_load_kv, then per layer wait_for_layer_load / attention / save_kv_layer,
then wait_for_save. Paged caches are numpy arrays in vLLM's layout [2][num_blocks][16][H][D];
a fake model writes each token's K and V, a function of the token prefix, into its slot."""
import hashlib
import pickle
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import kvs

kvstash = kvs.client_package()
from kvstash.integrations import vllm as kv_vllm  # noqa: E402 (the client package)

BS, L, H, D, NUM_BLOCKS = 16, 4, 2, 64, 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(L)]


# ------------------------------------------------------------------ a vLLM-shaped driver
def vllm_config(target, namespace, **extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector="KvstashConnector", kv_role="kv_both",
            kv_connector_module_path="kvstash.integrations.vllm",
            kv_connector_extra_config=dict(target=target, namespace=namespace, **extra)),
        cache_config=SimpleNamespace(block_size=BS),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))


def token_kv(tokens, pos):
    """The fake model's K and V of token `pos` at every layer, [L][2][H][D]: a function of
    tokens[:pos+1], as real KV is (so shared prefixes share KV)."""
    seed = zlib.crc32(np.asarray(tokens[:pos + 1], np.int64).tobytes())
    return np.random.default_rng(seed).standard_normal((L, 2, H, D)).astype(np.float16)


def expected_block(tokens, j):
    """Block j of a prompt as kvstash stores it: [L][2][t][H][D]."""
    return np.stack([token_kv(tokens, p) for p in range(j * BS, (j + 1) * BS)], axis=2)


class Blocks:
    """Stands for vLLM's KVCacheBlocks (one KV cache group)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_block_ids(self):
        return (self.ids,)


def request(rid, tokens, block_hashes=None):
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(tokens),
                           block_hashes=block_hashes)


def new_req(r, block_ids, num_computed):
    return SimpleNamespace(req_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                           block_ids=(list(block_ids),), num_computed_tokens=num_computed)


def sched_output(new=(), cached=(), scheduled=None):
    """cached: (req_id, new_block_ids or None, num_computed_tokens)."""
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[c[0] for c in cached], resumed_req_ids=set(),
            new_block_ids=[c[1] for c in cached], num_computed_tokens=[c[2] for c in cached]),
        num_scheduled_tokens=dict(scheduled or {}), finished_req_ids=set())


def _np(x):
    return x.cpu().numpy() if hasattr(x, "cpu") else x


class Engine:
    """One scheduler-side and one worker-side connector over numpy paged caches."""

    def __init__(self, target, namespace, device=None, **extra):
        cfg = vllm_config(target, namespace, **extra)
        self.sched = kv_vllm.KvstashConnector(cfg, kv_vllm.KVConnectorRole.SCHEDULER)
        self.worker = kv_vllm.KvstashConnector(cfg, kv_vllm.KVConnectorRole.WORKER)
        if device is None:
            self.caches = {n: np.zeros((2, NUM_BLOCKS, BS, H, D), np.float16) for n in LAYERS}
        else:  # torch tensors on `device`, as vLLM's are
            import torch
            self.caches = {n: torch.zeros((2, NUM_BLOCKS, BS, H, D), dtype=torch.float16,
                                          device=device) for n in LAYERS}
        self.device = device
        self.worker.register_kv_caches(self.caches)
        self.namespace = namespace

    def schedule(self, r, block_ids, num_computed_local=0):
        """vLLM's scheduler for a waiting request: lookup, allocate, update_state_after_alloc.
        Returns the external tokens."""
        n, load_async = self.sched.get_num_new_matched_tokens(r, num_computed_local)
        assert load_async is False
        self.sched.update_state_after_alloc(r, Blocks(block_ids), n)
        return n

    def step(self, so, compute, after_load=None, on_layer=None):
        """One engine step: build_connector_meta, then the worker's forward.
        compute: [(tokens, block_ids, first_pos, n_tokens)] the fake model computes.
        on_layer(meta, l) runs right after wait_for_layer_load of layer l; after_load(meta)
        once the forward is over (loads happen in the background until then)."""
        meta = pickle.loads(pickle.dumps(self.sched.build_connector_meta(so)))
        w = self.worker
        w.bind_connector_metadata(meta)
        w.start_load_kv(SimpleNamespace(attn_metadata={}, virtual_engine=0))
        for l, name in enumerate(LAYERS):
            w.wait_for_layer_load(name)
            if on_layer:
                on_layer(meta, l)
            for tokens, ids, first, n in compute:  # the layer's attention writes its KV
                for p in range(first, first + n):
                    kv = token_kv(tokens, p)[l]
                    if self.device is not None:
                        import torch
                        kv = torch.from_numpy(kv).to(self.device)
                    self.caches[name][:, ids[p // BS], p % BS] = kv
            w.save_kv_layer(name, self.caches[name], None)
        if after_load:  # every layer waited for: the loads are in
            after_load(meta)
        w.wait_for_save()
        assert w.get_finished(set()) == (None, None)
        w.clear_connector_metadata()
        return meta

    def layer_blocks(self, block_id):
        """vLLM block block_id across all layers, [L][2][t][H][D]."""
        return np.stack([_np(self.caches[n][:, block_id]) for n in LAYERS])

    def close(self):
        self.sched.shutdown()
        self.worker.shutdown()


@pytest.fixture(scope="module")
def target(module_daemon):
    return module_daemon(host_capacity="256M").target


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    p1 = rng.integers(1, 32000, 4 * BS + 5).tolist()              # 4 full blocks + 5 tokens
    p2 = p1[:2 * BS] + rng.integers(1, 32000, 2 * BS + 8).tolist()  # shares 2 blocks
    return p1, p2


def compute_request_1(e, p1, ids1):
    """Request 1 computes its prompt in two chunks (chunked prefill) and a decode step,
    saving its full blocks as they complete; then it finishes."""
    r1 = request("r1", p1)
    assert e.schedule(r1, ids1) == 0  # an empty store: a miss
    m = e.step(sched_output(new=[new_req(r1, ids1, 0)], scheduled={"r1": 40}),
               [(p1, ids1, 0, 40)])
    assert not m.loads and [t.block_ids for t in m.saves] == [ids1[:2]]  # 40 tokens: 2 blocks
    m = e.step(sched_output(cached=[("r1", None, 40)], scheduled={"r1": len(p1) - 40}),
               [(p1, ids1, 40, len(p1) - 40)])
    assert [t.block_ids for t in m.saves] == [ids1[2:4]]  # the partial 5th block is not saved
    m = e.step(sched_output(cached=[("r1", None, len(p1))], scheduled={"r1": 1}), [])
    assert not m.saves and not m.loads  # decode: nothing to do
    assert e.sched.request_finished(r1, ids1) == (False, None)
    return r1


# ------------------------------------------------------------------ tests
def _device(name):
    if name is None:
        return None
    torch = pytest.importorskip("torch")
    if name == "cpu":  # torch tensors: the adapter's torch path, CUDA streams aside
        return name
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the GPU machine runs this: tests/gpu/device-check.sh)")
    return name


@pytest.mark.parametrize("device", [None, "cpu", "cuda"], ids=["numpy", "torch-cpu", "cuda"])
def test_save_then_load_shared_prefix(target, device):
    e = Engine(target, kvs.ns_name("vllm"), device=_device(device))
    p1, p2 = prompts()
    ids1 = [3, 7, 1, 9, 12]
    compute_request_1(e, p1, ids1)

    with kvstash.Client(target) as c:
        keys1 = kvstash.block_keys(p1, BS)
        assert c.exists(e.namespace, keys1) == [True] * 4 + [False]  # no partial block
        stored = c.get_many(e.namespace, keys1[:4])
        for j in range(4):  # what was stored is exactly what the model wrote
            assert np.array_equal(stored[j], e.layer_blocks(ids1[j]))
            assert np.array_equal(stored[j], expected_block(p1, j))

    # Request 2 shares the first 2 blocks: 32 tokens come from kvstash, into new blocks.
    r2 = request("r2", p2)
    ids2 = [20, 21, 22, 23, 24]
    assert e.sched.get_num_new_matched_tokens(r2, 0) == (32, False)
    assert e.sched.get_num_new_matched_tokens(r2, 16) == (16, False)  # 1 block cached locally
    assert e.sched.get_num_new_matched_tokens(r2, 32) == (0, False)
    assert e.schedule(r2, ids2) == 32
    before = {n: _np(e.caches[n]).copy() for n in LAYERS}

    def check_layer(meta, l):  # right after wait_for_layer_load, before attention writes
        assert [(t.req_id, t.block_ids) for t in meta.loads] == [("r2", [20, 21])]
        n = LAYERS[l]
        cache = _np(e.caches[n])
        for j, b in enumerate([20, 21]):
            assert np.array_equal(cache[:, b], cache[:, ids1[j]])
        other = np.ones(NUM_BLOCKS, bool)  # nothing but blocks 20 and 21 changed
        other[[20, 21]] = False
        assert np.array_equal(cache[:, other], before[n][:, other])

    def check_loaded(meta):
        assert e.worker.get_block_ids_with_load_errors() == set()

    m = e.step(sched_output(new=[new_req(r2, ids2, 32)], scheduled={"r2": len(p2) - 32}),
               [(p2, ids2, 32, len(p2) - 32)], after_load=check_loaded, on_layer=check_layer)
    keys2 = kvstash.block_keys(p2, BS)
    assert [(t.keys, t.block_ids) for t in m.saves] == [(keys2[2:4], [22, 23])]  # not 0, 1
    e.sched.request_finished(r2, ids2)

    # Never the whole prompt: a prompt of exactly 4 stored blocks gets 3 (vLLM computes >= 1).
    assert e.sched.get_num_new_matched_tokens(request("r3", p1[:4 * BS]), 0) == (48, False)
    # A miss: no shared first block.
    miss = request("r4", [t + 1 for t in p1])
    assert e.schedule(miss, [25, 26, 27, 28, 29]) == 0
    m = e.sched.build_connector_meta(sched_output())
    assert not m.loads
    e.close()


def test_vllm_block_hashes_are_the_keys(target):
    """A request with vLLM's block hashes (32-byte SHA-256 chain, as vLLM >= 0.10) is stored
    and found under those hashes; an old-style hash object works through its hash_value."""
    e = Engine(target, kvs.ns_name("vllmh"))
    p1, _ = prompts(seed=3)

    def chain(tokens):
        h, out = b"seed", []
        for j in range(len(tokens) // BS):
            h = hashlib.sha256(h + np.asarray(tokens[j * BS:(j + 1) * BS], np.int64)
                               .tobytes()).digest()
            out.append(h)
        return out

    hashes = chain(p1)
    r1 = request("h1", p1, block_hashes=hashes)
    ids = [0, 1, 2, 3, 4]
    e.schedule(r1, ids)
    e.step(sched_output(new=[new_req(r1, ids, 0)], scheduled={"h1": len(p1)}),
           [(p1, ids, 0, len(p1))])
    e.sched.request_finished(r1, ids)
    with kvstash.Client(target) as c:
        assert c.exists(e.namespace, hashes) == [True] * 4
        assert not any(c.exists(e.namespace, kvstash.block_keys(p1, BS)[:4]))
    old_style = [SimpleNamespace(hash_value=h) for h in hashes[:2]]
    r2 = request("h2", p1[:2 * BS] + [5] * 3, block_hashes=old_style)
    assert e.sched.get_num_new_matched_tokens(r2, 0) == (32, False)
    assert kv_vllm.key_of_hash(2**70) == (2**70).to_bytes(32, "big")
    assert len(kv_vllm.key_of_hash(b"x" * 100)) == 32
    e.close()


def test_lossy_codec_namespace(target):
    """kivi-2: what comes back is close to what was saved, not equal."""
    e = Engine(target, kvs.ns_name("vllmq"), codec="kivi-2")
    with kvstash.Client(target) as c:
        ns = c.namespace(e.namespace)
        assert (ns.key_codec, ns.value_codec, ns.layers, ns.kv_heads, ns.head_dim,
                ns.block_tokens) == ("kivi-2", "kivi-2", L, H, D, BS)
    p1, p2 = prompts(seed=5)
    ids1 = [3, 7, 1, 9, 12]
    compute_request_1(e, p1, ids1)
    r2 = request("r2", p2)
    assert e.schedule(r2, [20, 21, 22, 23, 24]) == 32

    def check_loaded(meta):
        for j, b in enumerate([20, 21]):
            got = e.layer_blocks(b).astype(np.float32)
            want = expected_block(p1, j).astype(np.float32)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert 0 < err <= 0.5, err  # tests/integration/test_codecs.py BOUNDS["kivi-2"]

    e.step(sched_output(new=[new_req(r2, [20, 21, 22, 23, 24], 32)],
                        scheduled={"r2": len(p2) - 32}),
           [(p2, [20, 21, 22, 23, 24], 32, len(p2) - 32)], after_load=check_loaded)
    e.close()


def test_layers_load_in_the_background_group_by_group(target):
    """start_load_kv returns at once and layer 0 is usable while later layer groups are still
    being fetched: the second group's GetMany is held until the forward has used layer 0
    (an implementation that loads everything before returning would hang here and fail).
    load_layers_per_call=3 over 4 layers: two GetMany calls, [0, 3) and [3, 4)."""
    import threading
    e = Engine(target, kvs.ns_name("vllmg"), load_layers_per_call=3)
    p1, p2 = prompts(seed=9)
    ids1 = [3, 7, 1, 9, 12]
    compute_request_1(e, p1, ids1)
    r2 = request("r2", p2)
    assert e.schedule(r2, [20, 21, 22, 23, 24]) == 32
    gate, calls = threading.Event(), []
    real = e.worker.client.get_many

    def held(ns, keys, layers=None, **kw):
        calls.append(layers)
        if layers[0] > 0 and not gate.wait(10):
            raise TimeoutError("layer 0 was never used before the last group was fetched")
        return real(ns, keys, layers=layers, **kw)

    e.worker.client.get_many = held

    def on_layer(meta, l):
        if l == 0:
            gate.set()

    e.step(sched_output(new=[new_req(r2, [20, 21, 22, 23, 24], 32)],
                        scheduled={"r2": len(p2) - 32}), [], on_layer=on_layer)
    assert calls == [(0, 3), (3, 4)]
    assert e.worker.get_block_ids_with_load_errors() == set()
    for j, b in enumerate([20, 21]):
        assert np.array_equal(e.layer_blocks(b), expected_block(p1, j))
    e.close()


def test_evicted_block_is_a_load_error(target):
    """A block gone between the lookup and the load is reported to vLLM, not loaded."""
    e = Engine(target, kvs.ns_name("vllme"))
    p1, p2 = prompts(seed=7)
    compute_request_1(e, p1, [3, 7, 1, 9, 12])
    r2 = request("r2", p2)
    assert e.schedule(r2, [20, 21, 22, 23, 24]) == 32
    with kvstash.Client(target) as c:
        assert c.delete(e.namespace, kvstash.block_keys(p1, BS)[1:2]) == 1
    e.step(sched_output(new=[new_req(r2, [20, 21, 22, 23, 24], 32)],
                        scheduled={"r2": len(p2) - 32}), [],
           after_load=lambda m: None)
    assert e.worker.get_block_ids_with_load_errors() == {21}
    assert np.array_equal(e.layer_blocks(20), e.layer_blocks(3))
    e.close()


def test_config_defaults_and_mismatch(target, monkeypatch):
    monkeypatch.setenv("KVSTASH_TARGET", "unix:/nonexistent.sock")
    cfg = vllm_config(None, "x")
    cfg.kv_transfer_config.kv_connector_extra_config = {}
    c = kv_vllm.KvstashConnectorConfig.from_vllm_config(cfg)
    assert (c.target, c.namespace, c.key_codec, c.block_size) == (
        "unix:/nonexistent.sock", "vllm", "none", BS)
    monkeypatch.delenv("KVSTASH_TARGET")
    assert kv_vllm.KvstashConnectorConfig.from_vllm_config(cfg).target == "127.0.0.1:50051"
    with pytest.raises(ValueError, match="block size"):
        kv_vllm.KvstashConnectorConfig.from_vllm_config(vllm_config(target, "x", block_size=32))
    cfg.parallel_config.tensor_parallel_size = 2
    with pytest.raises(NotImplementedError):
        kv_vllm.KvstashConnectorConfig.from_vllm_config(cfg)

    # A namespace of another shape is refused, not overwritten.
    name = kvs.ns_name("vllmx")
    with kvstash.Client(target) as cl:
        cl.create_namespace(name, layers=L, kv_heads=H, head_dim=128, block_tokens=BS)
    w = kv_vllm.KvstashConnector(vllm_config(target, name), kv_vllm.KVConnectorRole.WORKER)
    with pytest.raises(ValueError, match="head_dim"):
        w.register_kv_caches({n: np.zeros((2, 4, BS, H, D), np.float16) for n in LAYERS})
    w.shutdown()

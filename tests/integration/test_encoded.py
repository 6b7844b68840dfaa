"""Encoded blocks on the wire (DESIGN §5): Get(format=ENCODED) returns the stored block,
which an independent Python reader of the format parses and checksums; for `none` its
sections are exactly the raw layers; stats count encoded bytes."""
import kvs

L, H, D, T = 3, 2, 32, 8


def test_encoded_none_block_matches_raw(daemon):
    d = daemon()
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T, seed=99))
    for t in (1, 5, T):
        data = ns.payload(t, seed=t)
        reply = kvs.put(d.stub, ns.name, b"k%d" % t, t, data)
        enc = kvs.get(d.stub, ns.name, b"k%d" % t, fmt=kvs.ENCODED)
        assert enc.header.format == kvs.ENCODED
        assert len(enc.data) == reply.encoded_bytes == enc.header.total_bytes
        assert reply.encoded_bytes == len(data) + kvs.encoded_prefix_bytes(L)
        hdr, sections = kvs.parse_encoded(enc.data)
        assert (hdr["layers"], hdr["kv_heads"], hdr["head_dim"], hdr["tokens"]) == (L, H, D, t)
        assert hdr["seed"] == 99 and hdr["k_codec"] == 0 and hdr["k_bits"] == 16
        sec = t * H * D * 2
        for i, (a, b) in enumerate(sections):
            assert enc.data[a:b] == data[i * sec:(i + 1) * sec]
    info = [n for n in d.admin.ListNamespaces(kvs.pb.ListNamespacesRequest()).namespaces
            if n.spec.name == ns.name][0]
    assert info.raw_bytes == sum(L * 2 * t * H * D * 2 for t in (1, 5, T))
    assert info.stored_bytes == info.raw_bytes + 3 * kvs.encoded_prefix_bytes(L)


def test_kvctl_get_local_decodes_on_the_client(daemon, tmp_path):
    """libkvstash fetches the encoded block and decodes it on the client's CPU: the bytes
    equal the server-decoded Get."""
    d = daemon()
    ns = kvs.Ns(kvs.make_ns(d.admin, L=L, H=H, D=D, T=T))
    data = ns.payload(5, seed=3)
    kvs.put(d.stub, ns.name, b"loc", 5, data)
    out = tmp_path / "local.bin"
    r = d.kvctl("get", ns.name, "loc", out, "--local")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data == kvs.get(d.stub, ns.name, b"loc").data
    r = d.kvctl("get", ns.name, "loc", out, "--local", "--encoded")
    assert r.returncode == 2

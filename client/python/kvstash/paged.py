"""Paged KV layouts (README "Paged layouts"): an inference engine keeps its KV cache in pages,
not as kvstash's contiguous block [L][2][t][H][D]. A PageLayout describes one buffer of such
pages (a numpy array, a CPU or a CUDA tensor) by byte offsets and strides, as the daemon's
wire layout and libkvstash's kvs_page_layout do; Client.put_many_paged / get_many_paged take
it. This module holds the layout and the host-side gather and scatter (the path when the
daemon cannot reach the buffer itself), each bounds-checked before a byte is touched.
"""
from typing import NamedTuple, Sequence

import numpy as np


class PageLayout(NamedTuple):
    """Byte offsets from the buffer's start of element [page 0][token 0][head 0][dim 0] of
    each layer's K and V planes, and the byte strides every plane shares (dims contiguous).
    A block of t tokens lies in ceil(t / page_tokens) pages, listed in order."""
    page_tokens: int
    k_base: Sequence[int]
    v_base: Sequence[int]
    page_stride: int
    token_stride: int
    head_stride: int

    @staticmethod
    def vllm(layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
             elem_bytes: int = 2, hnd: bool = False) -> "PageLayout":
        """vLLM's per-layer [2][num_blocks][block_size][H][D] caches, one after the other
        in one buffer (hnd: FlashInfer's [2][num_blocks][H][block_size][D])."""
        row = kv_heads * head_dim * elem_bytes
        plane = num_blocks * block_size * row
        return PageLayout(block_size, tuple(2 * plane * l for l in range(layers)),
                          tuple(2 * plane * l + plane for l in range(layers)),
                          block_size * row, head_dim * elem_bytes if hnd else row,
                          block_size * head_dim * elem_bytes if hnd else head_dim * elem_bytes)

    @staticmethod
    def sglang_page_first(layers: int, page_size: int, kv_heads: int, head_dim: int,
                          elem_bytes: int = 2) -> "PageLayout":
        """SGLang's page-first host pool [pages][L][2][page_size][H][D]."""
        row = kv_heads * head_dim * elem_bytes
        return PageLayout(page_size, tuple(2 * l * page_size * row for l in range(layers)),
                          tuple((2 * l + 1) * page_size * row for l in range(layers)),
                          layers * 2 * page_size * row, row, head_dim * elem_bytes)

    def pages_per_block(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)


def check(lay: PageLayout, nbytes: int, pages: Sequence[int], tokens: int, layers: int,
          kv_heads: int, head_dim: int, elem_bytes: int, what: str):
    """Raises ValueError naming the field unless every byte a gather or scatter of this
    block touches lies in [0, nbytes) (the daemon proves the same on its side)."""
    if lay.page_tokens < 1:
        raise ValueError(f"kvstash: {what}: layout.page_tokens must be at least 1")
    if len(lay.k_base) != layers or len(lay.v_base) != layers:
        raise ValueError(f"kvstash: {what}: layout has {len(lay.k_base)}/{len(lay.v_base)} "
                         f"k_base/v_base entries for {layers} layers")
    for name, v in (("page_stride", lay.page_stride), ("token_stride", lay.token_stride),
                    ("head_stride", lay.head_stride)):
        if v < 0 or v % elem_bytes:
            raise ValueError(f"kvstash: {what}: layout.{name} {v} is not a multiple of "
                             f"{elem_bytes} bytes")
    need = lay.pages_per_block(tokens)
    if len(pages) != need:
        raise ValueError(f"kvstash: {what}: {len(pages)} pages for {tokens} tokens "
                         f"(page_tokens {lay.page_tokens}: {need})")
    last_tok = min(tokens, lay.page_tokens) - 1
    span = last_tok * lay.token_stride + (kv_heads - 1) * lay.head_stride + \
        head_dim * elem_bytes
    for i, p in enumerate(pages):
        if p < 0:
            raise ValueError(f"kvstash: {what}: pages[{i}] is negative")
        for name, bases in (("k_base", lay.k_base), ("v_base", lay.v_base)):
            for l, b in enumerate(bases):
                if b < 0 or b % elem_bytes or b + p * lay.page_stride + span > nbytes:
                    raise ValueError(f"kvstash: {what}: pages[{i}] (page {p}) of layer {l}'s "
                                     f"{name} ends past the buffer's {nbytes} bytes")


def _plane(buf, lay: PageLayout, base: int, page: int, n: int, kv_heads: int, head_dim: int,
           elem_bytes: int):
    """A strided [n][H][D] view of one page's tokens of one plane in buf (a flat numpy
    array or torch tensor of elem_bytes-sized elements). Bounds: check() first."""
    start = (base + page * lay.page_stride) // elem_bytes
    strides = (lay.token_stride // elem_bytes, lay.head_stride // elem_bytes, 1)
    if isinstance(buf, np.ndarray):
        return np.lib.stride_tricks.as_strided(
            buf[start:], (n, kv_heads, head_dim), tuple(s * elem_bytes for s in strides),
            writeable=True)
    return buf.as_strided((n, kv_heads, head_dim), strides, buf.storage_offset() + start)


def move(buf, lay: PageLayout, pages: Sequence[int], block, tokens: int, to_pages: bool):
    """Gathers the block's pages of buf into block ([L][2][t][H][D], the same kind of array
    as buf) or scatters block into them (a block shorter than its pages' share: the first
    pages). buf is flat, of the block's element type (bits moved as they are)."""
    layers, _, _, kv_heads, head_dim = block.shape
    elem = block.itemsize if isinstance(block, np.ndarray) else block.element_size()
    for l in range(layers):
        for kv, base in ((0, lay.k_base[l]), (1, lay.v_base[l])):
            for i, p in enumerate(pages[:lay.pages_per_block(tokens)]):
                t0 = i * lay.page_tokens
                n = min(lay.page_tokens, tokens - t0)
                view = _plane(buf, lay, base, p, n, kv_heads, head_dim, elem)
                if to_pages:
                    view[...] = block[l, kv, t0:t0 + n]
                else:
                    block[l, kv, t0:t0 + n] = view

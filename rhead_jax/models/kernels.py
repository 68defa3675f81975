"""Prefill attention through the kernels that ship with JAX: splash attention (Pallas, TPU) and
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU). models.attention.chunked_attention
is the definition; this module computes the same outputs (and "span" masses) with the kernels.

Shapes as in models.attention: q [B, T, K, G, D]; the call's own keys and values k_new, v_new
[B, T, K, D]; the layer's cache kc, vc [B, K, S, D], which already holds them at slots
q_slot0[b] + t; positions q_pos [B, T] (-1: padding, at row ends) and k_pos [B, S]. Slots and
positions advance together within a row (as chunked_attention assumes).

A row's offset (how many keys its cache already holds) is data, and the kernels take static masks,
so each call is two kernel calls whose softmaxes merge by their log-sum-exps (as ring attention
and flash decoding merge partial softmaxes):
  A. the queries on the call's own keys: a static causal mask (a local band on a windowed layer);
  B. the queries on the cache's earlier slots (< q_slot0): every held slot (segment ids mark them;
     the kernel reads the smallest of a few static prefix lengths that covers the block's rows), or,
     on a windowed layer, the `Wr` slots before q_slot0 (rolled into place; Wr = the window rounded
     up to the key block) under a static band mask.
Masks come in by the query's scores: the uniform head mask multiplies scores, which is q times the
mask (q = 0 makes the softmax the mean of the visible values, what `uniform` means); the soft-cap
is the kernel's own.

Attention mass on "span" targets (the `query` score): from the merged log-sum-exp and the span's
keys only, sum_{q, k in span} exp(q.k * scale - lse_q), a loop over the span in blocks of
SPAN_BLOCK keys (no second pass over the cache).

Sharding: under a mesh (the runner traces its programs under `jax.sharding.use_abstract_mesh`) the
call runs in `jax.shard_map`, rows along "data" and KV heads along "model": each device runs the
kernel on its heads. `kernel_form` says when a call has no kernel form (it then runs chunked).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

NO_WINDOW = 2 ** 30      # models.attention.NO_WINDOW (imports point down: this module imports nothing of ours)
LANES = 128              # splash's key blocks are multiples of the TPU lane width
SPAN_BLOCK = 64          # span keys per step of the mass loop
KERNELS = ("chunked", "splash", "cudnn")
_logged: set = set()


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def log_once(message: str) -> None:
    """absl-log a fallback once per process."""
    if message not in _logged:
        _logged.add(message)
        logging.info("attention: %s", message)


def _block(n: int, cap: int = 512) -> int:
    """The largest of cap, cap/2, ..., 128 dividing n (n a multiple of 128)."""
    b = cap
    while n % b:
        b //= 2
    return b


def _mesh_axes(mesh, name: str) -> int:
    return dict(mesh.shape).get(name, 1) if mesh is not None and not mesh.empty else 1


def kernel_form(kernel: str, *, kv_heads: int, cache_size: int, windows: tuple[int, ...],
                masses: tuple[str, ...], sink, dtype) -> str | None:
    """None when `kernel` computes this call, else why not (the caller runs chunked and logs it).
    The mesh is the one the program is traced under (jax.sharding.get_abstract_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if kernel not in KERNELS or kernel == "chunked":
        return f"unknown kernel {kernel!r}"
    if not (isinstance(sink, int) and sink == 0):
        return "attention sinks have no kernel form"
    if any(m != "span" for m in masses):
        return f"masses {masses}: only 'span' has a kernel form (few keys); others need every key"
    model = _mesh_axes(mesh, "model")
    if kv_heads % model:
        return f"{kv_heads} KV heads do not split over the {model}-way model axis"
    for w in windows:
        if w < NO_WINDOW and round_up(max(w - 1, 1), LANES) >= round_up(cache_size, LANES):
            return f"window {w} spans the whole {cache_size}-slot cache"
        if w < NO_WINDOW and kernel == "cudnn":
            return "windowed layers: the cached part needs a rolled band, which cuDNN's masks do not express"
    if kernel == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, not {jnp.dtype(dtype).name}"
    return None


# ----------------------------------------------------------------------------- the two backends


def _splash(q, k, v, q_seg, kv_seg, mask, *, softcap, interpret):
    """q [B, H, Tq, D] (scaled), k, v [B, K, Sk, D], segment ids q_seg [B, Tq], kv_seg [B, Sk],
    a static splash mask of shape (Tq, Sk) -> (out [B, H, Tq, D] fp32, lse [B, H, Tq])."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    H, Tq, Sk = q.shape[1], q.shape[2], k.shape[2]
    bq, bkv = _block(Tq), _block(Sk)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * H), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                save_residuals=True, attn_logits_soft_cap=softcap, interpret=interpret)

    def one(q, k, v, qs, ks):
        out, (lse,) = kernel(q, k, v, segment_ids=sk.SegmentIds(q=qs, kv=ks))
        return out.astype(jnp.float32), lse

    return jax.vmap(one)(q, k, v, q_seg, kv_seg)


def _sdpa(q, k, v, *, causal, kv_len, window, implementation):
    """jax.nn.dot_product_attention on q [B, H, Tq, D] (scaled), k, v [B, K, Sk, D]: keys < kv_len [B]
    (None: all), causal (Tq == Sk) with an optional left window -> (out fp32, lse [B, H, Tq])."""
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, N, T, D] <-> [B, T, N, D]
    local = (window - 1, 0) if window < NO_WINDOW else None
    out, lse = jax.nn.dot_product_attention(t(q), t(k), t(v), scale=1.0, is_causal=causal,
                                            key_value_seq_lengths=kv_len, local_window_size=local,
                                            implementation=implementation, return_residual=True)
    return t(out).astype(jnp.float32), lse.transpose(0, 2, 1)


def _merge(parts):
    """Softmax pieces [(out [B, H, T, D], lse [B, H, T])] -> the softmax over their union."""
    m = parts[0][1]
    for _, lse in parts[1:]:
        m = jnp.maximum(m, lse)
    w = [jnp.exp(lse - m) for _, lse in parts]
    total = sum(w)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts)) / total[..., None]
    return out, m + jnp.log(total)


# ----------------------------------------------------------------------------- one call


def _part_a(qh, kn, vn, q_pos, *, window, kernel, softcap, interpret):
    """The queries on the call's own keys (kn, vn [B, K, T, D]): causal, within the window."""
    T = qh.shape[2]
    if kernel == "cudnn":
        return _sdpa(qh, kn, vn, causal=True, kv_len=None, window=window,
                     implementation="xla" if interpret else "cudnn")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    Tp = round_up(T, LANES)
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    qh, kn, vn = jnp.pad(qh, pad), jnp.pad(kn, pad), jnp.pad(vn, pad)
    mask = (sm.CausalMask((Tp, Tp)) if window >= NO_WINDOW
            else sm.LocalMask((Tp, Tp), window_size=(window - 1, 0), offset=0))
    seg = jnp.ones((qh.shape[0], Tp), jnp.int32)
    out, lse = _splash(qh, kn, vn, seg, seg, mask, softcap=softcap, interpret=interpret)
    return out[:, :, :T], lse[:, :, :T]


def _part_b(qh, kc, vc, q_pos, k_pos, q_slot0, *, window, kernel, softcap, interpret):
    """The queries on the cache's slots before q_slot0 (kc, vc [B, K, S, D])."""
    B, _, T, _ = qh.shape
    S = kc.shape[2]
    if kernel == "cudnn":   # rows hold slots [0, q_slot0) (contiguous): a key length per row
        return _sdpa(qh, kc, vc, causal=False, kv_len=q_slot0, window=NO_WINDOW,
                     implementation="xla" if interpret else "cudnn")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    Tp, Sp = round_up(T, LANES), round_up(S, LANES)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    q_seg = jnp.pad(jnp.where(q_pos >= 0, 1, 2), ((0, 0), (0, Tp - T)), constant_values=2)
    slot = jnp.arange(Sp)[None]
    if Sp > S:
        pad = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
        kc, vc = jnp.pad(kc, pad), jnp.pad(vc, pad)
        k_pos = jnp.pad(k_pos, ((0, 0), (0, Sp - S)), constant_values=-1)
    held = (k_pos >= 0) & (slot < q_slot0[:, None])

    def run(keys, vals, kv_seg, mask):
        out, lse = _splash(qh, keys, vals, q_seg, kv_seg.astype(jnp.int32), mask, softcap=softcap,
                           interpret=interpret)
        return out[:, :, :T], lse[:, :, :T]

    if window < NO_WINDOW:
        # the Wr slots before q_slot0, rolled so that index j holds slot q_slot0 - Wr + j (those
        # before slot 0 wrap around and are masked): query i sees j iff j >= i + Wr - window + 1
        Wr = round_up(max(window - 1, 1), LANES)
        start = jnp.maximum(q_slot0 - Wr, 0)
        shift = start - (q_slot0 - Wr)

        def window_of(x, s, r, axis):
            return jnp.roll(lax.dynamic_slice_in_dim(x, s, Wr, axis=axis), r, axis=axis)

        kw = jax.vmap(partial(window_of, axis=1))(kc, start, shift)
        vw = jax.vmap(partial(window_of, axis=1))(vc, start, shift)
        hw = jax.vmap(partial(window_of, axis=0))(held, start, shift) & (jnp.arange(Wr)[None] >= shift[:, None])
        return run(kw, vw, hw, sm.LocalMask((Tp, Wr), window_size=(0, None), offset=Wr - window + 1))

    # every held slot: the smallest static prefix of the cache that covers the rows' slots
    sizes = sorted({min(round_up(max(Sp >> i, 1), _block(Sp)), Sp) for i in range(4)})
    branches = [partial(lambda n, kc, vc, held: run(kc[:, :, :n], vc[:, :, :n], held[:, :n],
                                                    sm.FullMask((Tp, n))), n) for n in sizes]
    if len(branches) == 1:
        return branches[0](kc, vc, held)
    need = jnp.max(q_slot0)
    index = jnp.sum(need > jnp.asarray(sizes[:-1]))
    return lax.switch(index, branches, kc, vc, held)


def _span_mass(qh, kc, k_pos, q_pos, q_slot0, lse, targets, *, window, softcap):
    """[B, H, 1]: sum over the span's visible keys and the target's queries of exp(q.k - lse)
    (qh [B, H, T, D] scaled as the kernel saw it)."""
    B, H, T, D = qh.shape
    K, S = kc.shape[1], kc.shape[2]
    G = H // K
    qg = qh.reshape(B, K, G, T, D)
    lo, hi = targets.span[:, 0], targets.span[:, 1]
    shift = q_slot0 - jnp.where(q_pos[:, 0] >= 0, q_pos[:, 0], q_slot0)    # slot - position of the row
    n_blocks = jnp.max(-(-jnp.maximum(hi - lo, 0) // SPAN_BLOCK))
    qw = ((q_pos >= 0) & (q_pos >= targets.queries[:, 0, 0:1]) & (q_pos < targets.queries[:, 0, 1:2]))

    def body(j, acc):
        pos = lo[:, None] + j * SPAN_BLOCK + jnp.arange(SPAN_BLOCK)[None]          # [B, E]
        slot = jnp.clip(pos + shift[:, None], 0, S - 1)
        keys = jnp.take_along_axis(kc, slot[:, None, :, None], axis=2)             # [B, K, E, D]
        kp = jnp.take_along_axis(k_pos, slot, axis=1)
        ok = (pos < hi[:, None]) & (kp == pos)
        vis = (ok[:, None] & (kp[:, None] <= q_pos[:, :, None]) & (q_pos[:, :, None] - kp[:, None] < window)
               & qw[:, :, None])                                                 # [B, T, E]
        s = jnp.einsum("bkgtd,bked->bkgte", qg.astype(jnp.float32), keys.astype(jnp.float32))
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        p = jnp.exp(s - lse.reshape(B, K, G, T)[..., None])
        return acc + jnp.sum(jnp.where(vis[:, None, None], p, 0.0), axis=(-2, -1))

    return lax.fori_loop(0, n_blocks, body, jnp.zeros((B, K, G), jnp.float32)).reshape(B, H, 1)


def _local(q, k_new, v_new, kc, vc, q_pos, k_pos, q_slot0, score_scale, window, targets, *,
           scale, windows, kernel, interpret, softcap, masses):
    """One device's call (see `prefill_attention`)."""
    B, T, K, G, D = q.shape
    qf = q.astype(jnp.float32) * scale
    if score_scale is not None:                       # uniform mask: scores times m = (q * m) . k
        qf = qf * score_scale[None, None, :, :, None]
    qh = jnp.einsum("btkgd->bkgtd", qf.astype(q.dtype)).reshape(B, K * G, T, D)
    kn, vn = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)                         # [B, K, T, D]
    kw = dict(kernel=kernel, softcap=softcap, interpret=interpret)

    def with_window(w):
        return _merge([_part_a(qh, kn, vn, q_pos, window=w, **kw),
                       _part_b(qh, kc, vc, q_pos, k_pos, q_slot0, window=w, **kw)])

    if len(windows) == 1:
        out, lse = with_window(windows[0])
    else:                                           # per-layer windows: one branch per distinct window
        index = jnp.sum(jnp.asarray(windows) < window)
        out, lse = lax.switch(index, [partial(with_window, w) for w in windows])
    out = jnp.where((q_pos >= 0)[:, None, :, None], out, 0.0)      # padding queries (no visible key): 0
    out = jnp.einsum("bkgtd->btkgd", out.reshape(B, K, G, T, D)).astype(v_new.dtype)
    if not masses:
        return out
    return out, _span_mass(qh, kc, k_pos, q_pos, q_slot0, lse, targets, window=window,
                           softcap=softcap).reshape(B, K, G, 1)


def prefill_attention(q, k_new, v_new, kc, vc, q_pos, k_pos, q_slot0, *, window, windows: tuple[int, ...],
                      scale, kernel: str, score_scale=None, softcap=None, interpret: bool = False,
                      masses: tuple[str, ...] = (), targets=None):
    """chunked_attention's result through `kernel` ("splash" or "cudnn"): out [B, T, K, G, D], with
    masses (only ("span",), see `kernel_form`) also mass [B, K, G, 1].

    window: this layer's window (traced; NO_WINDOW = none), one of the static `windows`.
    interpret: splash in Pallas interpret mode / dot_product_attention's XLA implementation (the
    tests on CPU)."""
    windows = tuple(sorted(set(windows)))
    fn = partial(_local, scale=scale, windows=windows, kernel=kernel, interpret=interpret, softcap=softcap,
                 masses=masses)
    args = (q, k_new, v_new, kc, vc, q_pos, k_pos, q_slot0, score_scale, window, targets)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    rows = "data" if q.shape[0] % _mesh_axes(mesh, "data") == 0 else None
    heads = "model" if _mesh_axes(mesh, "model") > 1 else None
    rep = P()
    tspec = None if targets is None else jax.tree.map(lambda _: P(rows), targets)
    in_specs = (P(rows, None, heads), P(rows, None, heads), P(rows, None, heads), P(rows, heads), P(rows, heads),
                P(rows), P(rows), P(rows), None if score_scale is None else P(heads), rep, tspec)
    out_specs = (P(rows, None, heads), P(rows, heads)) if masses else P(rows, None, heads)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

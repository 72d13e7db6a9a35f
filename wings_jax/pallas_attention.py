"""The ``splash`` attention backend: Pallas TPU kernels with the contract of ``attention.attention``.

``jax.experimental.pallas.ops.tpu.splash_attention`` cannot serve here: its masks are NumPy arrays
fixed when the kernel is built, while ours follow per-row positions and padding known only at run
time. So the mask's index and validity vectors are kernel inputs and each tile's visibility is
computed in the kernel. A per-row table of which (query block, key block) tiles see anything, built
from the same vectors in O(L), lets a dead tile skip its compute and, by naming the block that a
neighbouring step loads, the copy of its keys or queries.

The shared value channels (``extra_values``) are a separate input with a float32 accumulator of
their own, so routed sums keep float32 whatever the dtype of v. Gradients come from two kernels:
dq (keys innermost) and dk/dv/d_extra (queries innermost, all query heads of a key/value head).
Off TPU the kernels run in a Pallas interpret mode, which is how the tests check them on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from wings_jax.attention import _NEG, MaskSpec, _pad_axis

LANES = 128  # TPU vector width: a block edge that lies along lanes must be a multiple of it
SPLASH_BLOCK = 512  # default tile edge, cut to the lengths rounded up to LANES
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_NT = (((1,), (1,)), ((), ()))  # dot_general dimensions of a @ b.T


def default_interpret() -> bool:
    """``interpret`` for ``pallas_call``: compiled on TPU, interpreted elsewhere. The plain interpreter
    runs about 3x faster on CPU than the TPU one (``pltpu.InterpretParams()``, which the tests also
    use: it fills unwritten scratch with NaN and refuses out-of-bounds block reads)."""
    return jax.default_backend() != "tpu"


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: MaskSpec,
                     extra_values: jnp.ndarray | None = None, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool | pltpu.InterpretParams | None = None,
                     ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Attention with Pallas kernels forward and backward (the contract of ``attention.attention``).

    Tiles are ``block_q`` x ``block_k`` (default ``SPLASH_BLOCK``, at most the length rounded up to
    ``LANES``); lengths are padded to whole blocks. ``interpret`` defaults to ``default_interpret()``.
    """
    _check_inputs(q, k, v, extra_values)
    interpret = default_interpret() if interpret is None else interpret
    q_len, kv_len = q.shape[1], k.shape[1]
    block_q = _block_size("block_q", block_q, q_len, interpret)
    block_k = _block_size("block_k", block_k, kv_len, interpret)
    pad_q, pad_k = -q_len % block_q, -kv_len % block_k
    qt = _pad_axis(q, 1, pad_q).transpose(0, 2, 1, 3)  # (B, H, Lq, hd)
    kt, vt = (_pad_axis(x, 1, pad_k).transpose(0, 2, 1, 3) for x in (k, v))  # (B, KV, Lk, hd)
    extra = None if extra_values is None else _pad_axis(extra_values, 1, pad_k)
    plan = _Plan(mask.causal, block_q, block_k, interpret)
    out, routed = _splash(qt, kt, vt, extra, _tables(mask, pad_q, pad_k, plan), plan)
    out = out.transpose(0, 2, 1, 3)[:, :q_len]
    return out, None if routed is None else routed[:, :q_len]


def _check_inputs(q, k, v, extra_values):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"splash attention needs q (B, Lq, H, hd) and k, v (B, Lk, KV, hd); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"splash attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                         "key/value heads")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        raise ValueError(f"splash attention needs q, k, v all float32 or all bfloat16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if extra_values is not None and (extra_values.ndim != 3 or extra_values.shape[:2] != k.shape[:2]):
        raise ValueError(f"splash attention needs extra_values (B, Lk, C) = {k.shape[:2]} + (C,); "
                         f"got {extra_values.shape}")


def _block_size(name: str, requested: int | None, length: int, interpret: bool | pltpu.InterpretParams) -> int:
    """The tile edge along ``length``: ``requested`` or ``SPLASH_BLOCK``, at most the length rounded up to LANES."""
    block = requested or SPLASH_BLOCK
    if block < 1 or (not interpret and block % LANES):
        wanted = "positive" if interpret else f"a multiple of {LANES} (the TPU lane width)"
        raise ValueError(f"splash attention {name}={block} must be {wanted}")
    return min(block, -(-length // LANES) * LANES)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static settings of one call: what the kernels are built for."""

    causal: bool
    block_q: int
    block_k: int
    interpret: bool | pltpu.InterpretParams


@struct.dataclass
class _Tables:
    """The mask padded to whole blocks, as int32, and the schedule of tiles."""

    q_index: jnp.ndarray  # (B, Lq)
    kv_index: jnp.ndarray  # (B, Lk)
    kv_valid: jnp.ndarray  # (B, Lk) 1 for a real key
    live: jnp.ndarray  # (B, n_q, n_k) 1 where some query of the query block sees some key of the key block
    # (B, n_q, n_k) the block to load at step (i, j): its own index when live, else the last live one
    # before it (the first one after it if there is none before), so that Pallas, seeing the block
    # index unchanged, skips the copy of a dead tile.
    fetch_k: jnp.ndarray  # key block, for the passes with keys innermost
    fetch_q: jnp.ndarray  # query block, for the pass with queries innermost


def _tables(mask: MaskSpec, pad_q: int, pad_k: int, plan: _Plan) -> _Tables:
    q_index = _pad_axis(mask.q_index.astype(jnp.int32), 1, pad_q)
    kv_index = _pad_axis(mask.kv_index.astype(jnp.int32), 1, pad_k)
    kv_valid = _pad_axis(mask.kv_valid, 1, pad_k)  # padded keys are invalid
    batch, n_q, n_k = q_index.shape[0], q_index.shape[1] // plan.block_q, kv_index.shape[1] // plan.block_k
    valid = kv_valid.reshape(batch, n_k, plan.block_k)
    if mask.causal:
        # some pair is visible iff the block's smallest valid key index <= its largest query index
        first_key = jnp.where(valid, kv_index.reshape(valid.shape), jnp.iinfo(jnp.int32).max).min(axis=2)
        last_query = q_index.reshape(batch, n_q, plan.block_q).max(axis=2)
        live = first_key[:, None, :] <= last_query[:, :, None]
    else:
        live = jnp.broadcast_to(valid.any(axis=2)[:, None, :], (batch, n_q, n_k))

    def fetch(axis):
        steps = jax.lax.broadcasted_iota(jnp.int32, live.shape, axis)
        last_live = jax.lax.cummax(jnp.where(live, steps, -1), axis=axis)
        first_live = jnp.argmax(live, axis=axis, keepdims=True).astype(jnp.int32)  # 0 if none is live
        return jnp.where(last_live < 0, first_live, last_live)

    return _Tables(q_index, kv_index, kv_valid.astype(jnp.int32), live.astype(jnp.int32), fetch(2), fetch(1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _splash(q, k, v, extra, tables: _Tables, plan: _Plan):
    return _splash_fwd(q, k, v, extra, tables, plan)[0]


def _splash_fwd(q, k, v, extra, tables: _Tables, plan: _Plan):
    """q (B, H, Lq, hd), k/v (B, KV, Lk, hd), extra (B, Lk, C) or None -> (out like q, routed (B, Lq, C)
    float32 or None), and the residuals for the backward pass."""
    out, lse, per_head_extra = _forward(q, k, v, extra, tables, plan)
    routed = None if extra is None else per_head_extra.sum(axis=1)
    return (out, routed), (q, k, v, extra, tables, out, per_head_extra, lse)


def _splash_bwd(plan: _Plan, residuals, cotangents):
    q, k, v, extra, tables, out, per_head_extra, lse = residuals
    d_out, d_routed = cotangents
    # The softmax backward subtracts rowsum(P * dP) = rowsum(O * dO) over every value channel of the
    # row, the shared ones included.
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)  # (B, H, Lq)
    if extra is not None:
        d_routed = d_routed.astype(jnp.float32)
        delta = delta + jnp.einsum("bhqc,bqc->bhq", per_head_extra, d_routed)
    grads = (d_out, d_routed, lse[..., 0], delta)
    dq = _backward_queries(q, k, v, extra, tables, plan, grads)
    dk, dv, d_extra = _backward_keys(q, k, v, extra, tables, plan, grads)
    return dq, dk, dv, None if extra is None else d_extra.sum(axis=1).astype(extra.dtype), None


_splash.defvjp(_splash_fwd, _splash_bwd)


def _forward(q, k, v, extra, tables: _Tables, plan: _Plan):
    """-> out like q, log-sum-exp (B, H, Lq, 1) and per-head routed sums (B, H, Lq, C) or None."""
    batch, heads, q_len, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k
    channels = None if extra is None else extra.shape[-1]
    operands, per_query, _ = _operands(q, k, v, extra, tables, plan, keys_outer=False)
    results = _pallas(
        functools.partial(_forward_kernel, causal=plan.causal, scale=head_dim ** -0.5),
        grid=(batch, heads, q_len // bq, k.shape[2] // bk), interpret=plan.interpret,
        prefetch=(tables.live, tables.fetch_k), inputs=operands,
        outputs={
            "out": (jax.ShapeDtypeStruct(q.shape, q.dtype), (None, None, bq, head_dim), per_query),
            "lse": (_f32(batch, heads, q_len, 1), (None, None, bq, 1), per_query),
            "out_extra": (None if extra is None else _f32(batch, heads, q_len, channels), (None, None, bq, channels),
                          per_query),
        },
        scratch={"row_max": (bq, 1), "denom": (bq, 1), "acc": (bq, head_dim),
                 "acc_extra": None if extra is None else (bq, channels)},
    )
    return results["out"], results["lse"], results["out_extra"]


def _backward_queries(q, k, v, extra, tables: _Tables, plan: _Plan, grads):
    batch, heads, q_len, head_dim = q.shape
    operands, per_query, _ = _operands(q, k, v, extra, tables, plan, keys_outer=False, grads=grads)
    results = _pallas(
        functools.partial(_dq_kernel, causal=plan.causal, scale=head_dim ** -0.5),
        grid=(batch, heads, q_len // plan.block_q, k.shape[2] // plan.block_k), interpret=plan.interpret,
        prefetch=(tables.live, tables.fetch_k), inputs=operands,
        outputs={"dq": (jax.ShapeDtypeStruct(q.shape, q.dtype), (None, None, plan.block_q, head_dim), per_query)},
        scratch={"dq_acc": (plan.block_q, head_dim)},
    )
    return results["dq"]


def _backward_keys(q, k, v, extra, tables: _Tables, plan: _Plan, grads):
    """-> dk, dv like k, and d_extra per key/value head (B, KV, Lk, C) float32 or None."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    bk = plan.block_k
    channels = None if extra is None else extra.shape[-1]
    operands, _, per_key = _operands(q, k, v, extra, tables, plan, keys_outer=True, grads=grads)
    results = _pallas(
        functools.partial(_dkv_kernel, causal=plan.causal, scale=head_dim ** -0.5),
        grid=(batch, kv_heads, kv_len // bk, heads // kv_heads, q_len // plan.block_q), interpret=plan.interpret,
        prefetch=(tables.live, tables.fetch_q), inputs=operands,
        outputs={
            "dk": (jax.ShapeDtypeStruct(k.shape, k.dtype), (None, None, bk, head_dim), per_key),
            "dv": (jax.ShapeDtypeStruct(v.shape, v.dtype), (None, None, bk, head_dim), per_key),
            "d_extra": (None if extra is None else _f32(batch, kv_heads, kv_len, channels),
                        (None, None, bk, channels), per_key),
        },
        scratch={"dk_acc": (bk, head_dim), "dv_acc": (bk, head_dim),
                 "de_acc": None if extra is None else (bk, channels)},
    )
    return results["dk"], results["dv"], results["d_extra"]


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _operands(q, k, v, extra, tables: _Tables, plan: _Plan, keys_outer: bool, grads=None):
    """The kernel inputs by name as (array, block shape, index map), and the index maps of per-query-head
    (B, H, Lq, X) and per-key-head (B, KV, Lk, X) arrays.

    The grid is (B, H, n_q, n_k), keys innermost, or with ``keys_outer`` (B, KV, n_k, G, n_q): the G query
    heads of a key/value head and all query blocks accumulate into one key block. ``grads`` adds the
    backward inputs: d_out like q, d_routed (B, Lq, C) or None, lse and delta (B, H, Lq).
    """
    bq, bk, head_dim = plan.block_q, plan.block_k, q.shape[-1]
    group = q.shape[1] // k.shape[1]
    channels = None if extra is None else extra.shape[-1]

    def place(pick):
        """An index map: grid position and prefetched tables -> pick(batch, q_head, q_block, kv_head, k_block)."""
        def index_map(*position):
            if keys_outer:
                b, kv_head, j, g, i, _, fetch = position
                return pick(b, kv_head * group + g, fetch[b, i, j], kv_head, j)
            b, head, i, j, _, fetch = position
            # lax.div truncates: cheaper than the sign-aware ``//`` on indices that are never negative
            return pick(b, head, i, jax.lax.div(head, group), fetch[b, i, j])
        return index_map

    per_query, per_key = place(lambda b, h, i, kh, j: (b, h, i, 0)), place(lambda b, h, i, kh, j: (b, kh, j, 0))

    # Per-position vectors lie along the tile's rows (a column) for the axis that indexes the rows and
    # along its lanes (a row) for the other, so that the in-kernel mask is a broadcast comparison.
    def query_vector(x):
        """(B, Lq) or (B, H, Lq): a column, or a row with ``keys_outer``."""
        lead, head = (None,) * (x.ndim - 1), (lambda h: (h,)) if x.ndim == 3 else (lambda h: ())
        if keys_outer:
            return x[..., None, :], (*lead, 1, bq), place(lambda b, h, i, kh, j: (b, *head(h), 0, i))
        return x[..., None], (*lead, bq, 1), place(lambda b, h, i, kh, j: (b, *head(h), i, 0))

    def key_vector(x):
        """(B, Lk): a row, or a column with ``keys_outer``."""
        if keys_outer:
            return x[..., None], (None, bk, 1), place(lambda b, h, i, kh, j: (b, j, 0))
        return x[..., None, :], (None, 1, bk), place(lambda b, h, i, kh, j: (b, 0, j))

    operands = {
        "q_index": query_vector(tables.q_index), "kv_index": key_vector(tables.kv_index),
        "kv_valid": key_vector(tables.kv_valid),
        "q": (q, (None, None, bq, head_dim), per_query),
        "k": (k, (None, None, bk, head_dim), per_key), "v": (v, (None, None, bk, head_dim), per_key),
        "extra": (extra, (None, bk, channels), place(lambda b, h, i, kh, j: (b, j, 0))),
    }
    if grads is not None:
        d_out, d_routed, lse, delta = grads
        operands |= {
            "d_out": (d_out, (None, None, bq, head_dim), per_query),
            "d_routed": (d_routed, (None, bq, channels), place(lambda b, h, i, kh, j: (b, i, 0))),
            "lse": query_vector(lse), "delta": query_vector(delta),
        }
    return operands, per_query, per_key


def _pallas(kernel, grid, interpret, prefetch, inputs, outputs, scratch):
    """``pallas_call`` with operands by name: the kernel gets its refs as keyword arguments.

    ``inputs`` and ``outputs`` map names to (array or ShapeDtypeStruct, block shape, index map),
    ``scratch`` names to float32 VMEM shapes; a None in place of the array or shape leaves the name out
    and the kernel gets None for it. ``prefetch`` (the live table, then a fetch table) reaches the kernel
    in SMEM as ``live`` and ``fetch`` and every index map as its last two arguments. The first three
    grid axes write distinct output blocks; the others accumulate. Returns the outputs by name.
    """
    declared = ["live", "fetch", *inputs, *outputs, *scratch]
    inputs = {name: entry for name, entry in inputs.items() if entry[0] is not None}
    outputs = {name: entry for name, entry in outputs.items() if entry[0] is not None}
    scratch = {name: shape for name, shape in scratch.items() if shape is not None}
    present = ["live", "fetch", *inputs, *outputs, *scratch]

    def body(*refs):
        kernel(**{**dict.fromkeys(declared), **dict(zip(present, refs, strict=True))})

    call = pl.pallas_call(
        body,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=grid,
            in_specs=[pl.BlockSpec(block, index_map) for _, block, index_map in inputs.values()],
            out_specs=[pl.BlockSpec(block, index_map) for _, block, index_map in outputs.values()],
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch.values()],
        ),
        out_shape=[shape for shape, _, _ in outputs.values()],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)),
        interpret=interpret,
    )
    results = call(*prefetch, *(array for array, _, _ in inputs.values()))
    return {**dict.fromkeys(declared), **dict(zip(outputs, results, strict=True))}


def _scores(rows, cols, scale):
    """Scaled float32 scores rows @ cols.T of one tile."""
    return _dot_nt(rows, cols) * scale


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _visible(q_index, kv_index, kv_valid, causal: bool, shape) -> jnp.ndarray:
    """The tile's visibility from its mask vectors, laid out (queries, keys) or (keys, queries) as they are."""
    seen = jnp.broadcast_to(kv_valid != 0, shape)
    if causal:
        seen = seen & (kv_index <= q_index)
    return seen


def _forward_kernel(*, causal, scale, live, fetch, q_index, kv_index, kv_valid, q, k, v, extra, out, lse,
                    out_extra, row_max, denom, acc, acc_extra):
    """One (query block, key block) tile of the online softmax; the last key block writes the outputs."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _start():
        row_max[...] = jnp.full(row_max.shape, _NEG, jnp.float32)
        for ref in (denom, acc, acc_extra):
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(live[b, i, j] != 0)
    def _update():
        scores = _scores(q[...], k[...], scale)  # (bq, bk)
        visible = _visible(q_index[...], kv_index[...], kv_valid[...], causal, scores.shape)
        scores = jnp.where(visible, scores, _NEG)
        new_max = jnp.maximum(row_max[...], scores.max(axis=1, keepdims=True))
        # a row with no visible key yet has new_max = _NEG, where exp(scores - new_max) would be 1
        probs = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
        rescale = jnp.exp(row_max[...] - new_max)
        denom[...] = rescale * denom[...] + probs.sum(axis=1, keepdims=True)
        acc[...] = rescale * acc[...] + _dot(probs.astype(v.dtype), v[...])
        if extra is not None:
            acc_extra[...] = rescale * acc_extra[...] + _dot(probs, extra[...].astype(jnp.float32))
        row_max[...] = new_max

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        seen = denom[...] > 0  # false for a query that sees no key: its outputs are zero
        total = jnp.where(seen, denom[...], 1.0)
        inverse = jnp.where(seen, 1.0 / total, 0.0)
        out[...] = (acc[...] * inverse).astype(out.dtype)
        lse[...] = jnp.where(seen, row_max[...] + jnp.log(total), 0.0)
        if extra is not None:
            out_extra[...] = acc_extra[...] * inverse


def _dq_kernel(*, causal, scale, live, fetch, q_index, kv_index, kv_valid, q, k, v, extra, d_out, d_routed, lse,
               delta, dq, dq_acc):
    """dq of one tile, the probabilities recomputed from the log-sum-exp; keys innermost."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _start():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(live[b, i, j] != 0)
    def _update():
        scores = _scores(q[...], k[...], scale)  # (bq, bk)
        visible = _visible(q_index[...], kv_index[...], kv_valid[...], causal, scores.shape)
        probs = jnp.where(visible, jnp.exp(scores - lse[...]), 0.0)
        d_probs = _dot_nt(d_out[...], v[...])
        if extra is not None:
            d_probs = d_probs + _dot_nt(d_routed[...], extra[...].astype(jnp.float32))
        d_scores = probs * (d_probs - delta[...]) * scale
        dq_acc[...] += _dot(d_scores.astype(k.dtype), k[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq[...] = dq_acc[...].astype(dq.dtype)


def _dkv_kernel(*, causal, scale, live, fetch, q_index, kv_index, kv_valid, q, k, v, extra, d_out, d_routed, lse,
                delta, dk, dv, d_extra, dk_acc, dv_acc, de_acc):
    """dk, dv and d_extra of one tile; the query heads of the group and the query blocks innermost.

    The tile is computed transposed, (keys, queries), so that every product is a plain or a
    right-transposed matmul.
    """
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _start():
        for ref in (dk_acc, dv_acc, de_acc):
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(live[b, i, j] != 0)
    def _update():
        scores = _scores(k[...], q[...], scale)  # (bk, bq)
        visible = _visible(q_index[...], kv_index[...], kv_valid[...], causal, scores.shape)
        probs = jnp.where(visible, jnp.exp(scores - lse[...]), 0.0)
        dv_acc[...] += _dot(probs.astype(d_out.dtype), d_out[...])
        d_probs = _dot_nt(v[...], d_out[...])
        if extra is not None:
            de_acc[...] += _dot(probs, d_routed[...])
            d_probs = d_probs + _dot_nt(extra[...].astype(jnp.float32), d_routed[...])
        d_scores = probs * (d_probs - delta[...]) * scale
        dk_acc[...] += _dot(d_scores.astype(q.dtype), q[...])

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk[...] = dk_acc[...].astype(dk.dtype)
        dv[...] = dv_acc[...].astype(dv.dtype)
        if extra is not None:
            d_extra[...] = de_acc[...]

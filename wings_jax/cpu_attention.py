"""The blockwise attention kernel compiled for the CPU: ``csrc/flash_attention_cpu.cc``, called through
XLA's FFI, float32, forward and backward (``attention`` backend ``cpu_flash``).

The C++ source is compiled on first use with the host's C++ compiler (``$CXX``, else ``g++``, for the
host's own vector instructions) into ``$WINGS_JAX_CACHE`` (default ``~/.cache/wings_jax``), once per
source, compiler, jaxlib and CPU. Where that fails (no compiler), ``available()`` is False, says why
once in the log, and ``auto`` keeps the pure-JAX ``flash`` kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "flash_attention_cpu.cc"
_TARGETS = {"wings_flash_forward_cpu": "WingsFlashForward", "wings_flash_backward_cpu": "WingsFlashBackward"}
# Tiles of (rows, keys). Small key blocks skip most of a causal mask's hidden half; the row blocks are
# the products' vector width.
BLOCK_ROWS, BLOCK_KEYS = 64, 64
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast")

log = logging.getLogger(__name__)


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str) -> Path:
    """Where the compiled kernel for this source, compiler, jaxlib and CPU lives (built if missing)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, jax.__version__, _cpu_signature(),
                                    *_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("WINGS_JAX_CACHE", Path.home() / ".cache" / "wings_jax"))
    library = cache / f"flash_attention_cpu-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    log.info("compiling the CPU attention kernel %s -> %s", SOURCE.name, library)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), "-o", str(built),
                                 str(SOURCE)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent processes each install a whole library
    return library


@functools.cache
def available() -> bool:
    """Is the compiled kernel registered with XLA (compiling it on first call)?"""
    if os.environ.get("WINGS_JAX_CPU_KERNEL", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (set $CXX): the cpu_flash attention kernel is unavailable, using flash")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(library_path(compiler)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        log.warning("the cpu_flash attention kernel is unavailable, using flash: %s", error)
        return False
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def usable(dtype) -> bool:
    """Can ``auto`` pick the kernel for CPU arrays of ``dtype``: float32, outside any multi-device mesh
    (the custom call cannot be partitioned, so a sharded model keeps the pure-JAX kernel), and compiled."""
    if jnp.dtype(dtype) != jnp.float32:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or mesh.size == 1) and available()


def cpu_flash_attention(q, k, v, mask, extra_values=None):
    """``wings_jax.attention.attention``'s contract on the compiled kernel (float32 only). The kernel
    reads and writes the model's layouts: any other layout here would be a transpose XLA fuses into
    its producer, which cost more than the kernel saved."""
    if not available():
        raise RuntimeError("attention backend 'cpu_flash' needs the compiled CPU kernel; see the log for why it "
                           "is unavailable, or use 'flash'")
    if q.dtype != jnp.float32:
        raise ValueError(f"attention backend 'cpu_flash' runs float32 only, got {q.dtype}; use 'flash'")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    extra = (jnp.zeros((batch, kv_len, 0), jnp.float32) if extra_values is None
             else extra_values.astype(jnp.float32))
    indices = (mask.q_index.astype(jnp.int32), mask.kv_index.astype(jnp.int32), mask.kv_valid.astype(jnp.int32))
    settings = _Settings(group=heads // kv_heads, causal=bool(mask.causal), scale=float(1.0 / np.sqrt(head_dim)))
    out, routed = _kernel(q, k, v, extra, indices, settings)
    if extra_values is None:
        return out, None
    # (B, KV, Lq * G, C) per head -> summed over the heads (B, Lq, C)
    routed = routed.reshape(batch, kv_heads, q_len, settings.group, -1).sum(axis=(1, 3))
    return out, routed


class _Settings(NamedTuple):
    group: int  # query heads per key/value head
    causal: bool
    scale: float

    def attributes(self) -> dict:
        return dict(group=np.int64(self.group), causal=self.causal, scale=np.float32(self.scale),
                    block_rows=np.int64(BLOCK_ROWS), block_keys=np.int64(BLOCK_KEYS))


def _call(target: str, results, *args, settings: _Settings):
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **settings.attributes())


def _forward(q, k, v, extra, indices, settings):
    """out (like q), each head's weighted channel sums (B, KV, Lq * G, C) and its rows' log-sum-exp."""
    rows = (q.shape[0], k.shape[2], q.shape[1] * settings.group)
    results = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((*rows, extra.shape[-1]), jnp.float32),
               jax.ShapeDtypeStruct(rows, jnp.float32))
    return _call("wings_flash_forward_cpu", results, q, k, v, extra, *indices, settings=settings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel(q, k, v, extra, indices, settings):
    return _forward(q, k, v, extra, indices, settings)[:2]


def _kernel_fwd(q, k, v, extra, indices, settings):
    out, routed, lse = _forward(q, k, v, extra, indices, settings)
    return (out, routed), (q, k, v, extra, indices, out, routed, lse)


def _kernel_bwd(settings, residuals, cotangents):
    q, k, v, extra, indices, out, routed, lse = residuals
    d_out, d_routed = cotangents
    results = (*(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
               jax.ShapeDtypeStruct((*k.shape[:3:2], k.shape[1], extra.shape[-1]), jnp.float32))
    d_q, d_k, d_v, d_extra = _call("wings_flash_backward_cpu", results, q, k, v, extra, *indices, out, routed, lse,
                                   d_out, d_routed, settings=settings)
    return d_q, d_k, d_v, d_extra.sum(axis=1), None  # the channels' cotangent, added over the heads


_kernel.defvjp(_kernel_fwd, _kernel_bwd)

"""The ``cpu_flash`` backend (the C++ kernel in wings_jax/csrc, through XLA FFI) against the ``xla``
reference: outputs, routed channels and gradients, alone and inside the stage-2 model; and when
``auto`` picks it."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from test_attention import check_against_xla, check_stage2_model_against_xla, masks, random_inputs

from wings_jax import cpu_attention
from wings_jax.attention import MaskSpec, attention, resolve_backend

if cpu_attention._compiler() is None:
    pytest.skip("no C++ compiler ($CXX or g++) to build the cpu_flash kernel", allow_module_level=True)

CPU_FLASH = functools.partial(attention, backend="cpu_flash")


@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse", "sample_sees_nothing"])
def test_kernel_matches_xla_on_every_mask(mask_name):
    """Head width 8 and 3 channels (both padded to 16 inside), 2 query heads per key/value head."""
    inputs, rng = random_inputs(0)
    check_against_xla(CPU_FLASH, inputs, masks(rng, 2, 37, 37)[mask_name])


@pytest.mark.parametrize("mask_name", ["causal_padded", "causal_sparse_shifted", "full_sparse"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(6, 2, 32), (4, 4, 72), (4, 1, 16)],
                         ids=["group3", "group1_width72", "two_heads_split"])
def test_kernel_matches_xla_over_many_blocks(mask_name, heads, kv_heads, head_dim):
    """Lengths spanning several 64-key and 64-row blocks with partial last blocks: visible, hidden and
    partly visible tiles; rows that are not whole vectors (group 3); and, with 2 (batch, key/value head)
    pairs for 2 threads, a backward split over key blocks with dQ summed over the parts."""
    inputs, rng = random_inputs(1, q_len=150, kv_len=203, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    mask = masks(rng, 2, 150, 203)[mask_name]
    mask = MaskSpec(mask.q_index + 203 - 150, mask.kv_index, mask.kv_valid, mask.causal)  # the last query sees all
    check_against_xla(CPU_FLASH, inputs, mask)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)], ids=["group1", "group3"])
def test_kernel_matches_xla_when_whole_blocks_see_nothing(heads, kv_heads):
    """The textual learner's case: the keys past an image span only (whole 64-key blocks invalid, whose
    operands the kernel does not prepare), and early queries that see no key (whole row blocks left at
    zero, their operands not prepared either)."""
    inputs, _ = random_inputs(3, q_len=200, kv_len=200, heads=heads, kv_heads=kv_heads, head_dim=32)
    index = jnp.broadcast_to(jnp.arange(200), (2, 200))
    text = (index >= 140) & (index < jnp.array([[200], [190]]))  # row 1 padded after 190
    check_against_xla(CPU_FLASH, inputs, MaskSpec(index, index, text, causal=True))


def test_stage2_model_on_the_kernel_matches_xla():
    """Main attention with the router channels and both learners, scanned layers: loss and every gradient."""
    check_stage2_model_against_xla("cpu_flash")


def test_auto_picks_the_kernel_for_float32_on_cpu_outside_meshes():
    assert cpu_attention.available()
    assert resolve_backend("auto", jnp.float32, 1024, 1024, platform="cpu") == "cpu_flash"
    assert resolve_backend("auto", jnp.bfloat16, 1024, 1024, platform="cpu") == "flash"
    assert resolve_backend("auto", jnp.float32, 1024, 1024, platform="gpu") == "flash"
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):  # the custom call cannot be partitioned: sharded models keep flash
        assert resolve_backend("auto", jnp.float32, 1024, 1024, platform="cpu") == "flash"


def test_kernel_refuses_bfloat16_with_a_clear_error():
    inputs, rng = random_inputs(2)
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in inputs)
    with pytest.raises(ValueError, match="float32 only"):
        attention(q, k, v, masks(rng, 2, 37, 37)["causal_padded"], backend="cpu_flash")


def test_without_a_compiler_auto_falls_back_to_flash(tmp_path):
    """No compiler: ``available()`` is False with a warning naming the fix, and ``auto`` picks flash."""
    script = (
        "import logging, jax.numpy as jnp\n"
        "logging.basicConfig()\n"
        "from wings_jax import cpu_attention\n"
        "from wings_jax.attention import resolve_backend\n"
        "print('available', cpu_attention.available())\n"
        "print('auto', resolve_backend('auto', jnp.float32, 1024, 1024, platform='cpu'))\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), WINGS_JAX_CACHE=str(tmp_path / "cache"),
               PATH="/nonexistent")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "available False" in result.stdout and "auto flash" in result.stdout
    assert "no C++ compiler (set $CXX)" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_kernel_is_compiled_once_per_source_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WINGS_JAX_CACHE", str(tmp_path))
    library = cpu_attention.library_path(cpu_attention._compiler())
    assert library.parent == tmp_path and library.suffix == ".so"
    built_at = library.stat().st_mtime_ns
    assert cpu_attention.library_path(cpu_attention._compiler()) == library
    assert library.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no leftover scratch

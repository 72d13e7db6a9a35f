"""Sharded training on the 8-device CPU mesh: same losses and parameters as one device, really sharded
state, restores onto other meshes, and clear errors for meshes that cannot work."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import traverse_util
from sharding_setup import GLOBAL_BATCH, MESHES, SEQ_LEN, batches, model_config, optimizer

from sharding import DEFAULT_RULES, Partitioner, ShardingError, make_mesh
from sharding.plan import plan
from sharding.specs import check_model
from train import checkpointing
from train.state import abstract_train_state, create_train_state
from train.step import make_train_step
from wings_jax.model import WingsModel

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup():
    config = model_config()
    tx, labels = optimizer(config)
    return config, tx, labels, batches(config)


@pytest.fixture(scope="module")
def reference(setup):
    """Three steps on one device: (initial state, losses, final params), all on the host."""
    config, tx, labels, data = setup
    device = jax.devices()[0]
    with jax.default_device(device):
        state = create_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN)
        initial = jax.device_get(state)
        step = make_train_step(WingsModel(config), tx, labels)
        losses = []
        for batch in data:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return initial, losses, jax.device_get(state.params)


def sharded_run(setup, initial, partitioner: Partitioner, init_sharded: bool):
    """Three sharded steps from ``initial`` (or from a directly sharded init): (first state, losses, state)."""
    config, tx, labels, data = setup
    partitioner.check(config, GLOBAL_BATCH)
    shardings = partitioner.state_shardings(config, abstract_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN))
    if init_sharded:
        state = create_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN, state_sharding=shardings)
    else:
        state = jax.device_put(initial, shardings)
    first = jax.device_get(state)
    step = partitioner.in_context(
        make_train_step(WingsModel(config), tx, labels, state_sharding=shardings,
                        batch_sharding=partitioner.batch_sharding())
    )
    losses = []
    for batch in data:
        state, metrics = step(state, partitioner.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return first, losses, state


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_really_sharded(state, mesh_shape):
    """Every parameter and Adam moment: each device holds total / (product of the mesh axes it is split over)."""
    for path, leaf in traverse_util.flatten_dict(state.params).items():
        spec = leaf.sharding.spec
        pieces = math.prod(
            math.prod(mesh_shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
            for axes in spec if axes is not None
        )
        shard = leaf.addressable_shards[0].data
        assert shard.nbytes * pieces == leaf.nbytes, ("/".join(path), spec, shard.shape, leaf.shape)
    sharded = [leaf for leaf in jax.tree.leaves(state.params) if any(leaf.sharding.spec)]
    return len(sharded)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_steps_match_one_device(setup, reference, name):
    initial, ref_losses, ref_params = reference
    partitioner = Partitioner.from_config({"mesh": MESHES[name]})
    # One mesh creates its state directly sharded, the others place the reference's initial state.
    first, losses, state = sharded_run(setup, initial, partitioner, init_sharded=name == "fsdp4_tensor2")
    assert max_difference(first.params, initial.params) == 0.0
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOLERANCE)
    assert max_difference(jax.device_get(state.params), ref_params) <= TOLERANCE
    sharded_count = assert_really_sharded(state, partitioner.sizes)
    if MESHES[name]["fsdp"] * MESHES[name]["tensor"] > 1:
        assert sharded_count > 20
        kernel = state.params["decoder"]["lm_head"]["kernel"]  # (embed, vocab) -> (fsdp, tensor)
        assert kernel.addressable_shards[0].data.nbytes == kernel.nbytes // (MESHES[name]["fsdp"]
                                                                             * MESHES[name]["tensor"])


def test_checkpoint_restores_onto_other_meshes(setup, reference, tmp_path):
    """Saved from fsdp=8, restored onto fsdp=4 x tensor=2 and onto a single device."""
    config, tx, _, _ = setup
    initial = reference[0]
    abstract = abstract_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN)
    source = Partitioner.from_config({"mesh": {"fsdp": 8}})
    state = jax.device_put(initial, source.state_shardings(config, abstract))
    manager = checkpointing.make_manager(tmp_path, keep=1, async_save=False)
    checkpointing.save(manager, 1, state, {"position": 7})
    manager.wait_until_finished()
    for target in (Partitioner.from_config({"mesh": {"fsdp": 4, "tensor": 2}}),
                   Partitioner.from_config({"mesh": {}}, devices=jax.devices()[:1])):
        shardings = target.state_shardings(config, abstract)
        restored, data_states = checkpointing.restore(manager, 1, target.abstract_sharded(abstract, shardings))
        assert data_states == [{"position": 7}]
        assert max_difference(jax.device_get(restored), initial) == 0.0
        for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
            assert leaf.sharding == sharding
    manager.close()


def test_mesh_must_fit_device_count():
    with pytest.raises(ShardingError, match=r"mesh data=2 x fsdp=2 x tensor=1 needs 4 devices, but there are 8"):
        make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ShardingError, match=r"fixed axes need a multiple of 3 devices, but there are 8, so fsdp=-1"):
        make_mesh({"fsdp": -1, "tensor": 3})
    with pytest.raises(ShardingError, match=r"mesh has -1 on \['data', 'fsdp'\]"):
        make_mesh("data=-1,fsdp=-1")
    with pytest.raises(ShardingError, match=r"unknown axes \['model'\]"):
        make_mesh({"model": 8})
    mesh = make_mesh("fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_hybrid_mesh_needs_matching_slices():
    # One process on CPU: one DCN granule, so a dcn axis of 2 cannot be placed.
    with pytest.raises(ShardingError, match=r"needs 2 slices \(DCN granules\), but there are 1"):
        make_mesh({"fsdp": -1}, dcn={"data": 2})
    mesh = make_mesh({"fsdp": -1, "tensor": 2}, dcn={"data": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("change, tensor, message", [
    ({}, 8, r"text.num_heads=4 is not divisible by mesh tensor=8 \(logical axis 'act_heads'\)"),
    ({}, 4, r"text.num_kv_heads=2 is not divisible by mesh tensor=4"),
    (dict(vocab_size=511), 2, r"text.vocab_size=511 is not divisible by mesh tensor=2"),
    (dict(intermediate_size=102), 4, r"text.intermediate_size \(MLP width\)=102 is not divisible by mesh tensor=4"),
])
def test_tensor_axis_must_divide_model_widths(setup, change, tensor, message):
    config = setup[0]
    config = config.replace(text=dataclasses.replace(config.text, **change))
    with pytest.raises(ShardingError, match=message):
        check_model(config, {"data": 1, "fsdp": 1, "tensor": tensor}, DEFAULT_RULES)


def test_partitioner_check_names_the_bad_width(setup):
    partitioner = Partitioner.from_config({"mesh": {"tensor": 8}})
    with pytest.raises(ShardingError, match=r"text.num_heads=4 is not divisible by mesh tensor=8"):
        partitioner.check(setup[0])


def test_global_batch_must_divide_data_times_fsdp(setup):
    config = setup[0]
    partitioner = Partitioner.from_config({"mesh": {"data": 2, "fsdp": 2, "tensor": 2}})
    with pytest.raises(ShardingError, match=r"global batch 6 is not divisible by data=2 x fsdp=2 = 4 batch shards"):
        partitioner.check(config, global_batch=6)
    with pytest.raises(ShardingError, match=r"global batch 8 / grad_accum 4 = micro-batches of 2 rows"):
        partitioner.check(config, global_batch=8, grad_accum=4)


def test_planner_bytes_match_the_bytes_placed_on_devices(setup, reference):
    """The planner's per-device parameter and optimizer-state bytes vs. the shards on each device (10 %)."""
    config, tx, labels, _ = setup
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    partitioner = Partitioner.from_config({"mesh": mesh})
    abstract = abstract_train_state(config, tx, jax.random.PRNGKey(0), SEQ_LEN)
    state = jax.device_put(reference[0], partitioner.state_shardings(config, abstract))
    planned = plan(config, mesh, tx, labels, GLOBAL_BATCH, SEQ_LEN)
    for device in jax.devices():
        for planned_bytes, tree in ((planned.params, state.params), (planned.opt_state, state.opt_state)):
            placed = sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
                         for shard in leaf.addressable_shards if shard.device == device)
            assert abs(planned_bytes - placed) <= 0.1 * placed, (device, planned_bytes, placed)
    # Frozen groups hold no optimizer state: Adam's two moments cover the trained parameters only.
    assert planned.opt_state < 2 * planned.params

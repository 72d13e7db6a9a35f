"""Reference Wings checkpoints (spec section 7) <-> wings_jax: tensor placement, bit-exact round trips, bad inputs.

The reference checkpoints are built here from the spec's naming with random tensors, independently of the
converter's name map; expected placements are written out below from the spec's layout rules.
"""

import json
import logging

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from convert import jax_to_torch, torch_to_jax
from wings_jax.checkpoint import load_params
from wings_jax.presets import tiny_model

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
BF16 = np.dtype(ml_dtypes.bfloat16)


def reference_tensors(text: str, stage: int, dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a tiny reference Wings checkpoint, named as spec section 7 says, with random values."""
    config = tiny_model(text)
    t, v, r = config.text, config.vision, config.wings.lora_dim
    d, q, kv, hd = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, v.hidden_size
    shapes = {
        VISION_PREFIX + "embeddings.patch_embedding.weight": (hd, 3, v.patch_size, v.patch_size),
        VISION_PREFIX + "embeddings.patch_embedding.bias": (hd,),
        VISION_PREFIX + "embeddings.position_embedding.weight": (v.num_patches, hd),
        VISION_PREFIX + "post_layernorm.weight": (hd,),
        VISION_PREFIX + "post_layernorm.bias": (hd,),
        "model.mm_projector.0.weight": (d, hd), "model.mm_projector.0.bias": (d,),
        "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,),
        "model.embed_tokens.weight": (t.vocab_size, d), "model.norm.weight": (d,),
    }
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, d)
    for j in range(v.num_layers - 1):  # the reference stores the tower without its last layer
        prefix = f"{VISION_PREFIX}encoder.layers.{j}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{prefix}{norm}.weight": (hd,), f"{prefix}{norm}.bias": (hd,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{prefix}self_attn.{proj}.weight": (hd, hd), f"{prefix}self_attn.{proj}.bias": (hd,)}
        ff = v.intermediate_size
        shapes |= {f"{prefix}mlp.fc1.weight": (ff, hd), f"{prefix}mlp.fc1.bias": (ff,),
                   f"{prefix}mlp.fc2.weight": (hd, ff), f"{prefix}mlp.fc2.bias": (hd,)}
    for i in range(t.num_layers):
        prefix = f"model.layers.{i}."
        shapes |= {prefix + "input_layernorm.weight": (d,), prefix + "post_attention_layernorm.weight": (d,),
                   prefix + "self_attn.q_proj.weight": (q, d), prefix + "self_attn.k_proj.weight": (kv, d),
                   prefix + "self_attn.v_proj.weight": (kv, d), prefix + "self_attn.o_proj.weight": (d, q),
                   prefix + "mlp.gate_proj.weight": (t.intermediate_size, d),
                   prefix + "mlp.up_proj.weight": (t.intermediate_size, d),
                   prefix + "mlp.down_proj.weight": (d, t.intermediate_size)}
        if t.attention_bias:
            shapes |= {prefix + "self_attn.q_proj.bias": (q,), prefix + "self_attn.k_proj.bias": (kv,),
                       prefix + "self_attn.v_proj.bias": (kv,)}
        for learner in ("attn_pool", "attn_t_pool"):
            for proj in "qkvo":
                shapes |= {f"{prefix}{learner}.{proj}_proj.0.weight": (r, d),
                           f"{prefix}{learner}.{proj}_proj.1.weight": (d, r)}
        if stage == 2:
            shapes |= {prefix + "reweight_module.linear.weight": (2, 4096),
                       prefix + "reweight_module.linear.bias": (2,)}
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32).astype(dtype) for name, shape in shapes.items()}


def hf_llm_config(text: str) -> transformers.PretrainedConfig:
    """The HF Qwen2 / Llama config of a tiny text preset, spelled out field by field."""
    t = tiny_model(text).text
    cls = transformers.Qwen2Config if t.architecture == "qwen2" else transformers.LlamaConfig
    extra = {"attention_bias": t.attention_bias} if t.architecture == "llama" else {}
    return cls(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
               num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
               rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, rope_scaling=t.rope_scaling_dict,
               tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings, **extra)


def hf_siglip_vision_config() -> transformers.SiglipVisionConfig:
    """The HF config of the tiny SigLIP preset (3 layers)."""
    v = tiny_model().vision
    return transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
    )


def reference_config(text: str, vision_folder) -> dict:
    """A reference config.json: the LLM's HF config plus the mm_* and learner fields."""
    hf = hf_llm_config(text)
    return {**hf.to_dict(), "architectures": [f"Wings{type(hf).__name__.removesuffix('Config')}ForCausalLM"],
            "mm_vision_tower": str(vision_folder), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
            "mm_vision_select_layer": -2, "lora_dim": 8, "system_prompt_length": 3, "image_token_length": 16}


def siglip_config_folder(path):
    """A local 'vision tower' folder whose config.json describes the tiny SigLIP (3 layers)."""
    hf_siglip_vision_config().save_pretrained(path)
    return path


def write_checkpoint(folder, tensors: dict[str, np.ndarray], config: dict, layout: str) -> None:
    """Save as one safetensors file, three safetensors shards with an index, or a pytorch_model.bin."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if layout == "single":
        save_file(tensors, str(folder / "model.safetensors"))
    elif layout == "sharded":
        names = sorted(tensors)
        weight_map = {}
        for k in range(3):
            shard = f"model-{k + 1:05d}-of-00003.safetensors"
            save_file({n: tensors[n] for n in names[k::3]}, str(folder / shard))
            weight_map |= {n: shard for n in names[k::3]}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save({n: _to_torch(a) for n, a in tensors.items()}, folder / "pytorch_model.bin")


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def read_safetensors_folder(folder) -> dict[str, np.ndarray]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file_name), framework="np") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    assert set(out) == set(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    return siglip_config_folder(tmp_path_factory.mktemp("siglip"))


def _layer(tree: dict, name: str, index: int, scanned: bool):
    """Fetch layer ``index``'s subtree: slot ``index`` of every leaf of a scanned stack, else ``layers_{index}``."""
    if not scanned:
        return tree[f"layers_{index}"]

    def pick(node):
        return {k: pick(v) for k, v in node.items()} if isinstance(node, dict) else node[index]

    return pick(tree[name])


def expected_placements(tensors, params, scanned: bool):
    """(torch name, value found in params, value the spec's layout rules predict) for every tensor."""
    linear = lambda a: a.T  # torch Linear (out, in) -> Dense kernel (in, out)
    vt, dec = params["vision_tower"], params["decoder"]
    out = [
        (VISION_PREFIX + "embeddings.patch_embedding.weight", vt["embeddings"]["patch_embedding"]["kernel"],
         lambda a: a.transpose(2, 3, 1, 0)),
        (VISION_PREFIX + "embeddings.patch_embedding.bias", vt["embeddings"]["patch_embedding"]["bias"], None),
        (VISION_PREFIX + "embeddings.position_embedding.weight", vt["embeddings"]["position_embedding"]["embedding"],
         None),
        (VISION_PREFIX + "post_layernorm.weight", vt["post_layernorm"]["scale"], None),
        (VISION_PREFIX + "post_layernorm.bias", vt["post_layernorm"]["bias"], None),
        ("model.mm_projector.0.weight", params["projector"]["linear_0"]["kernel"], linear),
        ("model.mm_projector.0.bias", params["projector"]["linear_0"]["bias"], None),
        ("model.mm_projector.2.weight", params["projector"]["linear_1"]["kernel"], linear),
        ("model.mm_projector.2.bias", params["projector"]["linear_1"]["bias"], None),
        ("model.embed_tokens.weight", dec["embed_tokens"]["embedding"], None),
        ("model.norm.weight", dec["norm"]["scale"], None),
    ]
    if "lm_head.weight" in tensors:
        out.append(("lm_head.weight", dec["lm_head"]["kernel"], linear))
    j = 0
    while f"{VISION_PREFIX}encoder.layers.{j}.layer_norm1.weight" in tensors:
        layer, prefix = _layer(vt, "layers", j, scanned), f"{VISION_PREFIX}encoder.layers.{j}."
        for module in ("layer_norm1", "layer_norm2"):
            out += [(f"{prefix}{module}.weight", layer[module]["scale"], None),
                    (f"{prefix}{module}.bias", layer[module]["bias"], None)]
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                       "mlp.fc2"):
            group, proj = module.split(".")
            out += [(f"{prefix}{module}.weight", layer[group][proj]["kernel"], linear),
                    (f"{prefix}{module}.bias", layer[group][proj]["bias"], None)]
        j += 1
    i = 0
    while f"model.layers.{i}.input_layernorm.weight" in tensors:
        layer, prefix = _layer(dec, "layers", i, scanned), f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"{prefix}{norm}.weight", layer[norm]["scale"], None))
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            group, proj = module.split(".")
            out.append((f"{prefix}{module}.weight", layer[group][proj]["kernel"], linear))
            if f"{prefix}{module}.bias" in tensors:
                out.append((f"{prefix}{module}.bias", layer[group][proj]["bias"], None))
        for torch_name, jax_name in (("attn_pool", "visual_learner"), ("attn_t_pool", "textual_learner")):
            for proj in "qkvo":
                out += [(f"{prefix}{torch_name}.{proj}_proj.0.weight", layer[jax_name][f"{proj}_a"]["kernel"], linear),
                        (f"{prefix}{torch_name}.{proj}_proj.1.weight", layer[jax_name][f"{proj}_b"]["kernel"], linear)]
        if f"{prefix}reweight_module.linear.weight" in tensors:
            out += [(f"{prefix}reweight_module.linear.weight", layer["router"]["kernel"], linear),
                    (f"{prefix}reweight_module.linear.bias", layer["router"]["bias"], None)]
        i += 1
    return out


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


@pytest.mark.parametrize("text,stage,scan", [("tiny_qwen2", 2, False), ("tiny_llama", 1, True)])
def test_every_tensor_lands_where_the_spec_says(tmp_path, vision_folder, text, stage, scan):
    tensors = reference_tensors(text, stage, np.float32)
    write_checkpoint(tmp_path / "src", tensors, reference_config(text, vision_folder), "single")
    torch_to_jax.convert_reference(tmp_path / "src", tmp_path / "jax", scan=scan)
    params, config = load_params(tmp_path / "jax")

    placements = expected_placements(tensors, params, scan)
    assert sorted(name for name, _, _ in placements) == sorted(tensors)
    for name, found, layout in placements:
        expected = tensors[name] if layout is None else layout(tensors[name])
        assert found.shape == expected.shape and np.array_equal(found, expected), name
    assert (config.wings.stage, config.wings.mask_mode, config.wings.lora_dim) == (stage, "reference", 8)
    assert config.wings.router_positions == (4096 if stage == 2 else config.wings.router_positions)
    assert (config.vision.num_layers, config.vision.select_layer, config.vision.kept_layers) == (3, -2, 2)
    assert config.scan_layers == scan and config.text == tiny_model(text).text


ROUND_TRIPS = [
    # text, stage, input layout, scanned output, dtype
    ("tiny_qwen2", 2, "sharded", False, np.float32),
    ("tiny_qwen2", 1, "single", True, BF16),
    ("tiny_llama", 2, "single", True, np.float32),
    ("tiny_llama", 1, "sharded", False, BF16),
    ("tiny_qwen2", 2, "bin", True, BF16),
]


@pytest.mark.parametrize("text,stage,layout,scan,dtype", ROUND_TRIPS)
def test_round_trip_is_bit_exact(tmp_path, vision_folder, text, stage, layout, scan, dtype):
    tensors = reference_tensors(text, stage, dtype, seed=stage)
    write_checkpoint(tmp_path / "src", tensors, reference_config(text, vision_folder), layout)
    assert torch_to_jax.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "jax")]
                             + (["--scan"] if scan else [])) == 0
    # A small shard limit forces several output shards.
    assert jax_to_torch.main(["--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"),
                              "--max-shard-size", "20KB"]) == 0

    back = read_safetensors_folder(tmp_path / "back")
    assert len(set(json.loads((tmp_path / "back/model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert sorted(back) == sorted(tensors)
    for name, original in tensors.items():
        assert back[name].dtype == original.dtype and back[name].shape == original.shape, name
        assert np.array_equal(_bits(back[name]), _bits(original)), name
    exported_config = json.loads((tmp_path / "back/config.json").read_text())
    assert exported_config == json.loads((tmp_path / "src/config.json").read_text())


def test_dtype_cast_to_float32_and_back_is_bit_exact_for_bfloat16(tmp_path, vision_folder):
    tensors = reference_tensors("tiny_qwen2", 2, BF16)
    write_checkpoint(tmp_path / "src", tensors, reference_config("tiny_qwen2", vision_folder), "single")
    torch_to_jax.convert_reference(tmp_path / "src", tmp_path / "jax", dtype="float32")
    params, config = load_params(tmp_path / "jax")
    assert config.param_dtype == "float32"
    assert params["decoder"]["embed_tokens"]["embedding"].dtype == np.float32
    jax_to_torch.export(tmp_path / "jax", tmp_path / "back", dtype="bfloat16")
    back = read_safetensors_folder(tmp_path / "back")
    assert all(np.array_equal(_bits(back[n]), _bits(a)) for n, a in tensors.items())


def _assert_failed_cleanly(tmp_path, caplog, argv, *needles):
    with caplog.at_level(logging.ERROR):
        assert torch_to_jax.main(argv) == 1
    for needle in needles:
        assert needle in caplog.text
    assert not (tmp_path / "jax").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".jax")], "a partial output folder was left"


@pytest.fixture()
def bad_source(tmp_path, vision_folder):
    tensors = reference_tensors("tiny_qwen2", 1, np.float32)
    return tmp_path / "src", tensors, reference_config("tiny_qwen2", vision_folder)


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path, caplog, bad_source):
    src, tensors, config = bad_source
    del tensors["model.layers.1.attn_pool.k_proj.0.weight"]
    write_checkpoint(src, tensors, config, "single")
    _assert_failed_cleanly(tmp_path, caplog, ["--src", str(src), "--dst", str(tmp_path / "jax")],
                           "missing: model.layers.1.attn_pool.k_proj.0.weight (expected shape (8, 64))")


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path, caplog, bad_source):
    src, tensors, config = bad_source
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    tensors["model.extra.weight"] = np.ones(2, np.float32)
    write_checkpoint(src, tensors, config, "single")
    _assert_failed_cleanly(tmp_path, caplog, ["--src", str(src), "--dst", str(tmp_path / "jax")],
                           "wrong shape: model.norm.weight: expected (64,), found (63,)",
                           "unexpected: model.extra.weight (shape (2,))")


def test_unknown_architecture_is_refused(tmp_path, caplog, bad_source):
    src, tensors, config = bad_source
    config |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    write_checkpoint(src, tensors, config, "single")
    _assert_failed_cleanly(tmp_path, caplog, ["--src", str(src), "--dst", str(tmp_path / "jax")],
                           "unknown LLM architecture (model_type='mistral'")


def test_truncated_safetensors_is_refused(tmp_path, caplog, bad_source):
    src, tensors, config = bad_source
    write_checkpoint(src, tensors, config, "sharded")
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_failed_cleanly(tmp_path, caplog, ["--src", str(src), "--dst", str(tmp_path / "jax")],
                           f"{shard} is not a readable safetensors file")


def test_existing_destination_is_kept(tmp_path, caplog, bad_source):
    src, tensors, config = bad_source
    write_checkpoint(src, tensors, config, "single")
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "keep.txt").write_text("mine")
    with caplog.at_level(logging.ERROR):
        assert torch_to_jax.main(["--src", str(src), "--dst", str(tmp_path / "jax")]) == 1
    assert "already exists" in caplog.text and (tmp_path / "jax" / "keep.txt").read_text() == "mine"

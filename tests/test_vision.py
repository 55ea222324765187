"""vision.py and the file side of data.py: HF checkpoint helpers, CLIP tower vs a plain-math reference,
preprocessing, projector."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import vision as V  # noqa: E402

CFG = V.VisionConfig.tiny()

# -----------------------------------------------------------------------------
# tiny checkpoints with the real HF key names


def hf_vision_tensors(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    D, Fw, C, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size
    t = {"vision_model.embeddings.class_embedding": r(D),
         "vision_model.embeddings.patch_embedding.weight": r(D, C, p, p),
         "vision_model.embeddings.position_embedding.weight": r(cfg.num_patches + 1, D),
         "vision_model.pre_layrnorm.weight": 1 + r(D), "vision_model.pre_layrnorm.bias": r(D),
         "vision_model.post_layernorm.weight": 1 + r(D), "vision_model.post_layernorm.bias": r(D)}
    for i in range(cfg.num_hidden_layers):
        L = f"vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[L + f"self_attn.{n}.weight"], t[L + f"self_attn.{n}.bias"] = r(D, D), r(D)
        for n in ("layer_norm1", "layer_norm2"):
            t[L + f"{n}.weight"], t[L + f"{n}.bias"] = 1 + r(D), r(D)
        t[L + "mlp.fc1.weight"], t[L + "mlp.fc1.bias"] = r(Fw, D), r(Fw)
        t[L + "mlp.fc2.weight"], t[L + "mlp.fc2.bias"] = r(D, Fw), r(D)
    return t


def hf_vision_config(cfg):
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "attention_dropout": 0.0,
            "hidden_act": "quick_gelu", "hidden_size": cfg.hidden_size, "image_size": cfg.image_size,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
            "layer_norm_eps": 1e-5, "num_attention_heads": cfg.num_attention_heads, "num_channels": 3,
            "num_hidden_layers": cfg.num_hidden_layers, "patch_size": cfg.patch_size, "projection_dim": 32,
            "torch_dtype": "float32"}


def clipmodel_extras(cfg, seed=1):
    """What a full CLIPModel file holds besides the vision tower."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    Dt, T = 32, 16
    t = {"text_model.embeddings.token_embedding.weight": r(50, Dt),
         "text_model.embeddings.position_embedding.weight": r(T, Dt),
         "text_model.embeddings.position_ids": torch.arange(T).unsqueeze(0),
         "text_model.final_layer_norm.weight": r(Dt), "text_model.final_layer_norm.bias": r(Dt),
         "vision_model.embeddings.position_ids": torch.arange(cfg.num_patches + 1).unsqueeze(0),
         "visual_projection.weight": r(32, cfg.hidden_size), "text_projection.weight": r(32, Dt),
         "logit_scale": torch.tensor(2.6592)}
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
              "layer_norm2"):
        t[f"text_model.encoder.layers.0.{n}.weight"], t[f"text_model.encoder.layers.0.{n}.bias"] = r(Dt, Dt), r(Dt)
    return t


def clipmodel_config(cfg):
    text = {"model_type": "clip_text_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 50, "max_position_embeddings": 16}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32,
            "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": hf_vision_config(cfg)}


def write_folder(folder, config, tensors, shards=1):
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return folder
    keys, weight_map = sorted(tensors), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return folder


def reference_hidden_states(t, cfg, px_BCSS):
    """CLIP vision forward written out from the raw HF tensors (float64, explicit loops); all hidden states."""
    g = lambda k: t["vision_model." + k].double()  # noqa: E731
    B, p, D, H = px_BCSS.shape[0], cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads
    n, K, x = cfg.image_size // p, D // H, px_BCSS.double()
    Wp = g("embeddings.patch_embedding.weight").reshape(D, -1)
    seqs = []
    for b in range(B):
        seq = [g("embeddings.class_embedding")]
        for i in range(n):  # row-major patch order
            for j in range(n):
                seq.append(Wp @ x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1))
        seqs.append(torch.stack(seq))
    h = torch.stack(seqs) + g("embeddings.position_embedding.weight")

    def ln(v, name):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + cfg.layer_norm_eps) * g(name + ".weight") + g(name + ".bias")

    def lin(v, name):
        return v @ g(name + ".weight").T + g(name + ".bias")

    h = ln(h, "pre_layrnorm")
    states = [h]
    for i in range(cfg.num_hidden_layers):
        L = f"encoder.layers.{i}."
        a = ln(h, L + "layer_norm1")
        q, k, v = (lin(a, L + f"self_attn.{n}_proj") for n in "qkv")
        att = torch.zeros_like(a)
        for hd in range(H):
            s = slice(hd * K, (hd + 1) * K)
            scores = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(K)
            w = torch.exp(scores - scores.max(-1, keepdim=True).values)
            att[..., s] = (w / w.sum(-1, keepdim=True)) @ v[..., s]
        h = h + lin(att, L + "self_attn.out_proj")
        m = lin(ln(h, L + "layer_norm2"), L + "mlp.fc1")
        h = h + lin(m * torch.sigmoid(1.702 * m), L + "mlp.fc2")
        states.append(h)
    return states


def assert_matches(out, ref):
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-5)  # fp32 model vs fp64 reference, |h| ~ 30


def pixels(B=2, seed=0):
    return torch.randn(B, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vision_folder(tmp_path):
    t = hf_vision_tensors(CFG)
    return write_folder(tmp_path / "clip", hf_vision_config(CFG), t), t


# -----------------------------------------------------------------------------
# config


def test_config_presets():
    assert (CFG.image_size, CFG.patch_size, CFG.hidden_size, CFG.num_hidden_layers) == (48, 8, 96, 3)
    assert CFG.num_patches == 36 and CFG.run_layers == 2 and CFG.select_layer == -2
    big = V.VisionConfig.clip_vit_large_patch14_336()
    assert big.num_patches == 576 and big.run_layers == 23 and big.hidden_size == 1024
    with pytest.raises(ValueError, match="select_layer"):
        V.VisionConfig.tiny(select_layer=-5)


def test_from_hf_both_layouts():
    assert V.VisionConfig.from_hf(hf_vision_config(CFG)) == CFG
    assert V.VisionConfig.from_hf(clipmodel_config(CFG)) == CFG
    with pytest.raises(data.CheckpointError, match="hidden_act 'gelu'"):
        V.VisionConfig.from_hf({**hf_vision_config(CFG), "hidden_act": "gelu"})


# -----------------------------------------------------------------------------
# CLIP tower


@pytest.mark.parametrize("select_layer", [-2, -1, 0])
def test_forward_matches_reference(vision_folder, select_layer):
    folder, t = vision_folder
    model = V.load_clip(folder, select_layer=select_layer)
    assert len(model.encoder.layers) == {-2: 2, -1: 3, 0: 0}[select_layer]  # layers past select_layer not built
    px = pixels()
    with torch.no_grad():
        out = model(px)
    ref = reference_hidden_states(t, CFG, px)[select_layer][:, 1:]
    assert out.shape == (2, CFG.num_patches, CFG.hidden_size)
    assert_matches(out, ref)


def test_full_clipmodel_folder(tmp_path):
    t = hf_vision_tensors(CFG)
    folder = write_folder(tmp_path / "clip", clipmodel_config(CFG), {**t, **clipmodel_extras(CFG)})
    px = pixels()
    with torch.no_grad():
        out = V.load_clip(folder)(px)
    assert_matches(out, reference_hidden_states(t, CFG, px)[-2][:, 1:])


def test_unprefixed_vision_folder(tmp_path):
    t = hf_vision_tensors(CFG)  # transformers>=5 saves CLIPVisionModel without the vision_model. prefix
    folder = write_folder(tmp_path / "clip", hf_vision_config(CFG), {k[len("vision_model."):]: v for k, v in t.items()})
    px = pixels()
    with torch.no_grad():
        out = V.load_clip(folder)(px)
    assert_matches(out, reference_hidden_states(t, CFG, px)[-2][:, 1:])


def test_sharded_fp16_folder(tmp_path):
    t = {k: v.half() for k, v in hf_vision_tensors(CFG).items()}  # fp16 on disk, cast to the fp32 module
    folder = write_folder(tmp_path / "clip", clipmodel_config(CFG), {**t, **clipmodel_extras(CFG)}, shards=3)
    model = V.load_clip(folder)
    assert model.embeddings.patch_embedding.weight.dtype == torch.float32
    px = pixels()
    with torch.no_grad():
        out = model(px)
    assert_matches(out, reference_hidden_states(t, CFG, px)[-2][:, 1:])


def test_forward_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"expected \(B, 3, 48, 48\), found \(1, 3, 40, 40\)"):
        V.CLIPVision(CFG)(torch.zeros(1, 3, 40, 40))


def test_tiny_tower_trains():
    model = V.CLIPVision(CFG)
    model(pixels()).square().mean().backward()
    # no dead parameters (the layers' expert pools are empty: continual learning's, not the tower's)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." not in n)


# -----------------------------------------------------------------------------
# bad checkpoints: every one raises an error that names what is wrong


def _edit(tmp_path, config=None, drop=(), add=None, reshape=None):
    t = hf_vision_tensors(CFG)
    cfg = hf_vision_config(CFG) if config is None else config
    t = {k: v for k, v in t.items() if k not in drop}
    if reshape:
        t[reshape] = t[reshape][:-1]
    t.update(add or {})
    return write_folder(tmp_path / "clip", cfg, t)


def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: model folder not found"):
        V.load_clip(tmp_path / "nope")


def test_error_missing_config(tmp_path):
    folder = write_folder(tmp_path / "clip", None, hf_vision_tensors(CFG))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        V.load_clip(folder)


def test_error_malformed_config(tmp_path):
    folder = _edit(tmp_path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{\n  "hidden_size": 96,\n  "patch_size": 8,,\n}')
    with pytest.raises(ValueError, match=r"config.json: malformed JSON at line 3 column"):
        V.load_clip(folder)


def test_error_config_missing_field(tmp_path):
    cfg = hf_vision_config(CFG)
    del cfg["hidden_size"]
    with pytest.raises(KeyError, match=r"config.json: required field 'hidden_size' is missing"):
        V.load_clip(_edit(tmp_path, config=cfg))
    nested = clipmodel_config(CFG)
    del nested["vision_config"]["patch_size"]
    with pytest.raises(KeyError, match=r"config.json \[vision_config\]: required field 'patch_size'"):
        V.load_clip(_edit(tmp_path, config=nested))


def test_error_no_weights(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_vision_config(CFG)))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors.*pytorch_model.bin.*never loaded"):
        V.load_clip(folder)


def test_error_corrupt_safetensors(tmp_path):
    folder = _edit(tmp_path)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        V.load_clip(folder)


def test_error_missing_shard(tmp_path):
    folder = write_folder(tmp_path / "clip", hf_vision_config(CFG), hf_vision_tensors(CFG), shards=2)
    shard2 = os.path.join(folder, "model-00002-of-00002.safetensors")
    os.rename(shard2, shard2 + ".moved")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors: shard listed in .*index.json"):
        V.load_clip(folder)
    os.rename(shard2 + ".moved", shard2)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    weight_map["vision_model.ghost.weight"] = "model-00001-of-00002.safetensors"
    with open(index, "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(KeyError, match=r"index.json: 1 tensors listed in weight_map are not in their shard: "
                                       r"vision_model.ghost.weight \(in model-00001-of-00002.safetensors\)"):
        data.open_hf_tensors(folder)


def test_error_wrong_shape(tmp_path):
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    with pytest.raises(ValueError, match=re.escape(f"{key}: expected (384, 96), found (383, 96)")):
        V.load_clip(_edit(tmp_path, reshape=key))


def test_error_missing_keys_all_listed(tmp_path):
    drop = ("vision_model.pre_layrnorm.bias", "vision_model.encoder.layers.0.self_attn.k_proj.weight")
    with pytest.raises(KeyError, match="missing keys") as e:
        V.load_clip(_edit(tmp_path, drop=drop))
    assert all(k in str(e.value) for k in drop)


def test_error_unexpected_keys_all_listed(tmp_path):
    add = {"vision_model.encoder.layers.3.mlp.fc1.bias": torch.zeros(384), "something.else": torch.zeros(2)}
    with pytest.raises(ValueError, match="unexpected keys") as e:
        V.load_clip(_edit(tmp_path, add=add))
    assert all(k in str(e.value) for k in add)


# -----------------------------------------------------------------------------
# the generic helpers


def test_load_mapped_checks_everything_before_copying():
    lin = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    mapping = {"w": "weight", "b": "bias"}
    with pytest.raises(ValueError, match=r"b: expected \(2,\), found \(3,\)"):
        data.load_mapped(lin, {"w": torch.ones(2, 3), "b": torch.ones(3)}, mapping, source="x.safetensors")
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())  # nothing half-loaded
    data.load_mapped(lin, {"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.full((2,), 2.0)}, mapping)
    assert lin.weight.dtype == torch.float32 and lin.weight.sum() == 6 and lin.bias.sum() == 4


def test_load_mapped_unmapped_params():
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Linear entries not loaded by any checkpoint key \(1\): bias"):
        data.load_mapped(lin, {"w": torch.ones(2, 3)}, {"w": "weight"}, source="f")
    data.load_mapped(lin, {"w": torch.ones(2, 3), "junk": torch.ones(1)}, {"w": "weight"}, skip=(r"^junk$",),
                  allow_unmapped=(r"^bias$",))
    assert lin.weight.sum() == 6
    with pytest.raises(ValueError, match="does not have: nope"):
        data.load_mapped(lin, {"w": torch.ones(2, 3)}, {"w": "nope"})


def test_require_and_read_json(tmp_path):
    assert data.require({"a": 1}, "a", "cfg.json") == 1
    with pytest.raises(KeyError, match="^cfg.json: required field 'b' is missing$"):
        data.require({"a": 1}, "b", "cfg.json")
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        data.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match="bad.json: malformed JSON at line 2 column 7"):
        data.read_json(tmp_path / "bad.json")


# -----------------------------------------------------------------------------
# images

MEAN, STD = np.array(data.CLIP_MEAN), np.array(data.CLIP_STD)


def norm(rgb):
    return (np.asarray(rgb, dtype=np.float64) / 255 - MEAN) / STD


def test_preprocess_normalisation_by_hand():
    arr = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    x = data.preprocess(Image.fromarray(arr), 48)  # square and already at size: no pad, resize is the identity
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), norm(arr).transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("wide", [True, False])
def test_preprocess_pads_with_mean_colour(wide):
    colour = (200, 30, 90)
    img = Image.new("RGB", (60, 30) if wide else (30, 60), colour)  # pads to 60x60, scaled to 48 (x0.8)
    x = data.preprocess(img, 48).numpy().transpose(1, 2, 0)  # S,S,C
    if not wide:
        x = x.transpose(1, 0, 2)  # padding is then left/right: look at it as rows
    pad = norm([int(255 * m) for m in data.CLIP_MEAN])  # LLaVA: tuple(int(x*255) for x in image_mean)
    np.testing.assert_allclose(x[:9], np.broadcast_to(pad, x[:9].shape), atol=1e-6)  # band 0..12 minus filter
    np.testing.assert_allclose(x[-9:], np.broadcast_to(pad, x[-9:].shape), atol=1e-6)
    np.testing.assert_allclose(x[15:33], np.broadcast_to(norm(colour), x[15:33].shape), atol=1e-6)


def test_preprocess_converts_modes_and_paths(tmp_path):
    grey = Image.new("L", (20, 20), 77)
    np.testing.assert_allclose(data.preprocess(grey, 8).numpy().transpose(1, 2, 0),
                               np.broadcast_to(norm([77, 77, 77]), (8, 8, 3)), atol=1e-6)
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    assert data.preprocess(rgba, 8).shape == (3, 8, 8)
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 24), (1, 2, 3)).save(path)
    assert torch.equal(data.preprocess(str(path), 16), data.preprocess(Image.open(path), 16))


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png: image file not found"):
        data.load_image(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        data.load_image(tmp_path / "notes.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    png = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match="cut.png: not a readable image"):
        data.load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="cut.png: not a readable image"):
        data.preprocess(str(tmp_path / "cut.png"), 16)
    assert data.load_image(tmp_path / "full.png").size == (64, 64)


# -----------------------------------------------------------------------------
# projector


def projector_file(tmp_path, vd=96, ld=40, edit=None):
    g = torch.Generator().manual_seed(0)
    t = {"model.mm_projector.0.weight": torch.randn(ld, vd, generator=g), "model.mm_projector.0.bias": torch.randn(ld),
         "model.mm_projector.2.weight": torch.randn(ld, ld, generator=g), "model.mm_projector.2.bias": torch.randn(ld),
         "model.embed_tokens.weight": torch.randn(10, ld)}  # a LLaVA file holds other keys too
    if edit:
        edit(t)
    path = str(tmp_path / "mm_projector.safetensors")
    save_file(t, path)
    return path, t


def test_projector_load_and_forward(tmp_path):
    path, t = projector_file(tmp_path)
    proj = V.load_projector(path)
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(2, 5, 96)
    w = lambda k: t["model.mm_projector." + k].double()  # noqa: E731
    h = x.double() @ w("0.weight").T + w("0.bias")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    ref = h @ w("2.weight").T + w("2.bias")
    with torch.no_grad():
        torch.testing.assert_close(proj(x).double(), ref, atol=1e-4, rtol=1e-5)


def test_projector_patch_merge_puts_each_block_of_patches_in_one_token():
    g, m, C = 6, 2, 3  # a 6 x 6 patch grid (MiniCoIN's) -> 3 x 3 tokens
    proj = V.Projector(C, 5, merge=m)
    x = torch.randn(2, g * g, C)
    blocks = [torch.cat([x[:, (m * i + a) * g + m * j + b] for a in range(m) for b in range(m)], -1)
              for i in range(g // m) for j in range(g // m)]  # row-major blocks, each row-major inside
    with torch.no_grad():
        torch.testing.assert_close(proj(x), proj[2](proj[1](proj[0](torch.stack(blocks, 1)))), atol=1e-6, rtol=1e-6)
        assert proj(x).shape == (2, 9, 5) and V.Projector(C, 5)(x).shape == (2, 36, 5)
    with pytest.raises(ValueError, match="patch merge 4: needs a square patch grid whose side divides by 4, got 36"):
        V.Projector(C, 5, merge=4)(x)


def test_projector_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.safetensors: safetensors file not found"):
        V.load_projector(tmp_path / "none.safetensors")
    path, _ = projector_file(tmp_path, edit=lambda t: t.pop("model.mm_projector.2.bias"))
    with pytest.raises(KeyError, match=r"missing keys \(1\): model.mm_projector.2.bias"):
        V.load_projector(path)
    path, _ = projector_file(tmp_path, edit=lambda t: t.update({"model.mm_projector.2.weight": torch.zeros(40, 41)}))
    with pytest.raises(ValueError, match=re.escape("model.mm_projector.2.weight: expected (40, 40), found (40, 41)")):
        V.load_projector(path)
    path, _ = projector_file(tmp_path, edit=lambda t: t.update({"model.mm_projector.4.weight": torch.zeros(4, 4)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model.mm_projector.4.weight"):
        V.load_projector(path)
    path, _ = projector_file(tmp_path, edit=lambda t: t.pop("model.mm_projector.0.weight"))
    with pytest.raises(KeyError, match="model.mm_projector.0.weight"):
        V.load_projector(path)


# -----------------------------------------------------------------------------
# optional: parity with transformers, using folders that transformers itself wrote


def test_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vc = transformers.CLIPVisionConfig(**{k: v for k, v in hf_vision_config(CFG).items()
                                          if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(vc).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF's own init is near-trivial (zero biases, unit norms): make every weight matter
            p.add_(torch.randn_like(p) * 0.2)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=clipmodel_config(CFG)["text_config"],
                                                          vision_config=vc.to_dict())).eval()
    full.vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()})
    hf.save_pretrained(tmp_path / "vision", safe_serialization=True)  # the key layout of the installed version
    full.save_pretrained(tmp_path / "full", safe_serialization=True, max_shard_size="100KB")  # sharded
    assert os.path.exists(tmp_path / "full" / "model.safetensors.index.json")
    px = pixels()
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        for sub in ("vision", "full"):
            torch.testing.assert_close(V.load_clip(tmp_path / sub)(px), ref, atol=1e-4, rtol=1e-4)

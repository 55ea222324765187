"""cmoe.py Llama + LLaVA: tiny checkpoints in the real HF layout vs. plain-math references written here.

Every reference below is computed from the raw checkpoint tensors (float64, explicit per-position RoPE,
per-head attention loops, hand-built splices), never from cmoe's own helpers. The transformers parity tests
at the end are optional (skipped when transformers is not installed).
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cmoe  # noqa: E402
import data  # noqa: E402
import vision  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# llama3 rule with a small original context so that a head_dim of 8 hits all three branches (kept / blended /
# slowed): with theta 1e4 the wavelengths are 6.3, 63, 628, 6283 against thresholds 64/4 = 16 and 64/1 = 64
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}  # the published Llama-3.1 values


def hf_config(**kw):
    """A LlamaForCausalLM config.json (transformers 4 layout: top-level rope_theta / rope_scaling); GQA 4:2."""
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "vocab_size": 64, "tie_word_embeddings": True, "max_position_embeddings": 256,
         "rope_scaling": dict(LLAMA3_SCALING), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
         "torch_dtype": "float32"}
    c.update(kw)
    return c


def hf_tensors(c, lm_head, seed=0):
    """Random weights under the real HF LlamaForCausalLM key names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    D, Fw, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    H, KV = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": 1 + r(D)}
    for i in range(c["num_hidden_layers"]):
        L = f"model.layers.{i}."
        t.update({L + "self_attn.q_proj.weight": r(H, D), L + "self_attn.k_proj.weight": r(KV, D),
                  L + "self_attn.v_proj.weight": r(KV, D), L + "self_attn.o_proj.weight": r(D, H),
                  L + "mlp.gate_proj.weight": r(Fw, D), L + "mlp.up_proj.weight": r(Fw, D),
                  L + "mlp.down_proj.weight": r(D, Fw),
                  L + "input_layernorm.weight": 1 + r(D), L + "post_attention_layernorm.weight": 1 + r(D)})
    if lm_head:
        t["lm_head.weight"] = r(V, D)
    return t


def write_folder(folder, config, tensors, shards=1):
    """HF model folder: config.json + model.safetensors, or `shards` files + model.safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return str(folder)
    keys, weight_map = sorted(tensors), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(folder)


# -----------------------------------------------------------------------------------------------------------
# independent references


def ref_inv_freq(head_dim, theta, scaling):
    """The published llama3 rule, one frequency at a time in Python floats."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        if scaling:
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:  # high frequency: untouched
                pass
            elif wavelen > old / lo:  # low frequency: slowed by factor
                f = f / factor
            else:  # in between: linear blend in old/wavelen
                s = (old / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / factor + s * f
        out.append(f)
    return out


def ref_llama_logits(t, c, ids_BT, embeds_BTD=None, return_hidden=False):
    """LlamaForCausalLM forward from raw HF tensors in float64: RMSNorm, half-split RoPE with cos/sin per
    position, GQA (query head h reads kv head h // rep), causal softmax attention, SwiGLU; tied head if no
    lm_head.weight. Rope parameters from the transformers-4 or -5 config layout."""
    g = lambda k: t[k].double()  # noqa: E731
    rp = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rp.get("rope_theta"))
    scaling = c.get("rope_scaling") or (rp if rp.get("rope_type") == "llama3" else None)
    D, nH, nKV, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd, rep = D // nH, nH // nKV
    half = hd // 2
    x = g("model.embed_tokens.weight")[ids_BT] if embeds_BTD is None else embeds_BTD.double()
    B, T, _ = x.shape
    inv = torch.tensor(ref_inv_freq(hd, theta, scaling), dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # [T, hd/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w

    def rope(v_BTd):  # pairs (i, i + hd/2) rotated by angle pos * inv_i
        a, b = v_BTd[..., :half], v_BTd[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["num_hidden_layers"]):
        L = f"model.layers.{i}."
        h = rms(x, g(L + "input_layernorm.weight"))
        q = (h @ g(L + "self_attn.q_proj.weight").T).view(B, T, nH, hd)
        k = (h @ g(L + "self_attn.k_proj.weight").T).view(B, T, nKV, hd)
        v = (h @ g(L + "self_attn.v_proj.weight").T).view(B, T, nKV, hd)
        heads = []
        for hh in range(nH):
            qh, kh, vh = rope(q[:, :, hh]), rope(k[:, :, hh // rep]), v[:, :, hh // rep]
            s = (qh @ kh.transpose(1, 2)) / math.sqrt(hd)
            s = s.masked_fill(~causal, float("-inf"))
            w = torch.exp(s - s.max(-1, keepdim=True).values)
            heads.append((w / w.sum(-1, keepdim=True)) @ vh)
        x = x + torch.cat(heads, -1) @ g(L + "self_attn.o_proj.weight").T
        h = rms(x, g(L + "post_attention_layernorm.weight"))
        gate, up = h @ g(L + "mlp.gate_proj.weight").T, h @ g(L + "mlp.up_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * up) @ g(L + "mlp.down_proj.weight").T
    x = rms(x, g("model.norm.weight"))
    if return_hidden:
        return x
    head = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]
    return x @ head.double().T


def close(a, b, atol=1e-4):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=1e-5)


IDS = torch.tensor([[1, 5, 9, 2, 33, 63, 0, 17, 8], [40, 3, 3, 12, 7, 21, 60, 4, 11]])


# -----------------------------------------------------------------------------------------------------------
# 1. loading HF Llama checkpoints


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_llama_matches_reference(tmp_path, tied, shards):
    c = hf_config(tie_word_embeddings=tied)
    t = hf_tensors(c, lm_head=not tied)
    model = cmoe.load_llama(write_folder(tmp_path / "m", c, t, shards)).eval()
    assert model.cfg.n_kv_heads == 2 < model.cfg.n_heads == 4 and model.cfg.rope_scaling
    with torch.no_grad():
        logits, _ = model(IDS)
    close(logits, ref_llama_logits(t, c, IDS))
    if tied:  # the head IS the embedding (one tensor), not a copy
        assert model.lm_head.weight is model.embed_tokens.weight
    else:
        assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
        close(model.lm_head.weight, t["lm_head.weight"], atol=0)


@pytest.mark.parametrize("layout", ["no_scaling", "transformers5"])
def test_load_llama_config_layouts(tmp_path, layout):
    """Plain RoPE (no rope_scaling), and the transformers>=5 layout that nests rope_theta and the llama3 rule in
    rope_parameters (what LlamaForCausalLM.save_pretrained writes today)."""
    if layout == "no_scaling":
        c = hf_config(rope_scaling=None, rope_theta=500.0)
    else:
        c = hf_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 20000.0})
        del c["rope_scaling"], c["rope_theta"]
    t = hf_tensors(c, lm_head=False, seed=3)
    model = cmoe.load_llama(write_folder(tmp_path / "m", c, t)).eval()
    hd = c["hidden_size"] // c["num_attention_heads"]
    rp = c.get("rope_parameters") or {}
    want = ref_inv_freq(hd, c.get("rope_theta", rp.get("rope_theta")), c.get("rope_scaling") or rp or None)
    close(model.inv_freq, torch.tensor(want), atol=1e-9)
    with torch.no_grad():
        close(model(IDS)[0], ref_llama_logits(t, c, IDS))


def test_skips_legacy_rotary_buffers(tmp_path):
    """Older HF files carry model.layers.*.self_attn.rotary_emb.inv_freq: derived, ignored."""
    c = hf_config()
    t = hf_tensors(c, lm_head=False)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    model = cmoe.load_llama(write_folder(tmp_path / "m", c, t)).eval()
    with torch.no_grad():
        close(model(IDS)[0], ref_llama_logits(t, c, IDS))


# -----------------------------------------------------------------------------------------------------------
# 2. RoPE


@pytest.mark.parametrize("theta,scaling,head_dim", [(500000.0, LLAMA31_SCALING, 128), (10000.0, LLAMA3_SCALING, 8),
                                                    (500000.0, None, 64)])
def test_rope_inv_freq(theta, scaling, head_dim):
    cfg = cmoe.LlamaConfig(dim=head_dim * 2, n_heads=2, n_kv_heads=1, rope_theta=theta, rope_scaling=scaling)
    got = cmoe.rope_inv_freq(cfg).double()
    want = torch.tensor(ref_inv_freq(head_dim, theta, scaling), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert bool((got[1:] <= got[:-1]).all())  # the rule keeps frequencies ordered
    if scaling:  # the cases really exercise all three branches of the rule
        plain = torch.tensor(ref_inv_freq(head_dim, theta, None), dtype=torch.float64)
        ratio = got / plain
        kept, slowed = (ratio - 1).abs() < 1e-6, (ratio - 1 / scaling["factor"]).abs() < 1e-6
        assert kept.any() and slowed.any() and (~kept & ~slowed).any()


def test_rope_tables_and_apply_rope():
    """cos/sin tables = cos/sin(pos * inv) twice over; apply_rope = complex rotation of pairs (i, i + d/2), and
    equals Meta's interleaved complex RoPE after the q/k row permutation HF uses to convert checkpoints."""
    cfg = cmoe.LlamaConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, rope_theta=1000.0,
                           rope_scaling=dict(LLAMA3_SCALING, original_max_position_embeddings=32))
    llm = cmoe.Llama(cfg)
    hd, half = cfg.head_dim, cfg.head_dim // 2
    g = torch.Generator().manual_seed(0)
    pos_BT = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7]])  # left padding repeats position 0
    cos, sin = llm.rope(pos_BT)
    inv = torch.tensor(ref_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling), dtype=torch.float64)
    ang = pos_BT[..., None].double() * inv
    close(cos, torch.cat([ang.cos(), ang.cos()], -1), atol=1e-6)
    close(sin, torch.cat([ang.sin(), ang.sin()], -1), atol=1e-6)

    q, k = torch.randn(2, 2, 5, hd, generator=g), torch.randn(2, 1, 5, hd, generator=g)
    x = torch.randn(3, hd, generator=g)
    close(cmoe.rotate_half(x), torch.cat([-x[:, half:], x[:, :half]], -1), atol=0)
    q2, k2 = cmoe.apply_rope(q, k, cos, sin)
    rot_BTd = torch.polar(torch.ones_like(ang), ang)[:, None]  # e^{i pos inv_j}, broadcast over heads

    def complex_half(v):  # pair (v_j, v_{j+d/2}) as v_j + i v_{j+d/2}
        z = torch.complex(v[..., :half].double(), v[..., half:].double()) * rot_BTd
        return torch.cat([z.real, z.imag], -1)
    close(q2, complex_half(q), atol=1e-5)
    close(k2, complex_half(k), atol=1e-5)

    # Meta layout: consecutive pairs (2j, 2j+1) rotated; HF permutes rows so pair j becomes (j, j + d/2)
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # half-split index -> interleaved index
    v_meta = q[..., perm.argsort()]  # the same vector in interleaved order
    z = torch.view_as_complex(v_meta.double().reshape(*v_meta.shape[:-1], half, 2).contiguous()) * rot_BTd
    meta_rot = torch.view_as_real(z).flatten(-2)
    close(q2, meta_rot[..., perm], atol=1e-5)


# -----------------------------------------------------------------------------------------------------------
# 3. bad input


def test_errors_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        cmoe.load_llama(str(tmp_path / "nope"))
    folder = write_folder(tmp_path / "m", None, hf_tensors(hf_config(), lm_head=False))
    with pytest.raises(FileNotFoundError, match="config.json"):
        cmoe.load_llama(folder)
    os.makedirs(tmp_path / "w")
    with open(tmp_path / "w" / "config.json", "w") as f:
        json.dump(hf_config(), f)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cmoe.load_llama(str(tmp_path / "w"))
    with open(tmp_path / "w" / "config.json", "w") as f:
        f.write('{\n "hidden_size": 32,\n oops\n}')
    with pytest.raises(ValueError, match=r"config.json.*line 3"):
        cmoe.load_llama(str(tmp_path / "w"))


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "vocab_size"])
def test_error_config_missing_field(tmp_path, field):
    c = hf_config()
    t = hf_tensors(c, lm_head=False)
    del c[field]
    with pytest.raises((KeyError, ValueError)) as e:
        cmoe.load_llama(write_folder(tmp_path / "m", c, t))
    assert field in str(e.value) and "config.json" in str(e.value)


def test_error_unsupported_rope_scaling(tmp_path):
    c = hf_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="linear"):
        cmoe.load_llama(write_folder(tmp_path / "m", c, hf_tensors(c, lm_head=False)))


def test_error_wrong_shape(tmp_path):
    c = hf_config()
    t = hf_tensors(c, lm_head=False)
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(49, 32)
    with pytest.raises(ValueError) as e:
        cmoe.load_llama(write_folder(tmp_path / "m", c, t))
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "(48, 32)" in msg and "(49, 32)" in msg
    assert str(tmp_path / "m") in msg


def test_error_missing_and_unexpected_keys(tmp_path):
    c = hf_config()
    t = hf_tensors(c, lm_head=False)
    gone = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.post_attention_layernorm.weight"]
    for k in gone:
        del t[k]
    with pytest.raises(KeyError) as e:
        cmoe.load_llama(write_folder(tmp_path / "a", c, t))
    assert all(k in str(e.value) for k in gone)

    t = hf_tensors(c, lm_head=False)
    extra = ["model.layers.0.self_attn.q_proj.bias", "model.vision_tower.weight"]
    t.update({k: torch.zeros(32) for k in extra})
    with pytest.raises(ValueError) as e:
        cmoe.load_llama(write_folder(tmp_path / "b", c, t))
    assert all(k in str(e.value) for k in extra) and "unexpected" in str(e.value)

    c2 = hf_config(num_hidden_layers=1)  # a file with more layers than the config says: layer 1 unexpected
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        cmoe.load_llama(write_folder(tmp_path / "c", c2, hf_tensors(c, lm_head=False)))


def test_error_missing_shard(tmp_path):
    c = hf_config()
    folder = write_folder(tmp_path / "m", c, hf_tensors(c, lm_head=False), shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        cmoe.load_llama(folder)


def test_nothing_half_loaded():
    """The loader checks every key before copying: a bad last tensor leaves the module untouched."""
    c = hf_config()
    cfg = cmoe.LlamaConfig.from_hf(c)
    model = cmoe.Llama(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = hf_tensors(c, lm_head=False)
    t["model.norm.weight"] = torch.zeros(33)  # every other tensor fine (and would change the weights)
    with pytest.raises(ValueError, match="model.norm.weight"):
        data.load_mapped(model, t, cmoe.llama_key_map(cfg, False), source="x",
                           allow_unmapped=[r"\.experts\.", r"^lm_head\.weight$"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -----------------------------------------------------------------------------------------------------------
# 4. a tiny LLaVA from HF-layout files

VCFG = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2)  # P = 4 patches; select_layer -2 runs 2 of the 3 layers
PAD = 62  # never used inside the prompts below


def clip_files(folder, seed=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    D, Fw, p, n = VCFG["hidden_size"], VCFG["intermediate_size"], VCFG["patch_size"], 4
    t = {"vision_model.embeddings.class_embedding": r(D),
         "vision_model.embeddings.patch_embedding.weight": r(D, 3, p, p),
         "vision_model.embeddings.position_embedding.weight": r(n + 1, D),
         "vision_model.pre_layrnorm.weight": 1 + r(D), "vision_model.pre_layrnorm.bias": r(D),
         "vision_model.post_layernorm.weight": 1 + r(D), "vision_model.post_layernorm.bias": r(D)}
    for i in range(VCFG["num_hidden_layers"]):
        L = f"vision_model.encoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[L + f"self_attn.{m}.weight"], t[L + f"self_attn.{m}.bias"] = r(D, D), r(D)
        for m in ("layer_norm1", "layer_norm2"):
            t[L + f"{m}.weight"], t[L + f"{m}.bias"] = 1 + r(D), r(D)
        t[L + "mlp.fc1.weight"], t[L + "mlp.fc1.bias"] = r(Fw, D), r(Fw)
        t[L + "mlp.fc2.weight"], t[L + "mlp.fc2.bias"] = r(D, Fw), r(D)
    cfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5, "num_channels": 3, "projection_dim": 8, **VCFG}
    return write_folder(folder, cfg, t), t


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    clip_dir, clip_t = clip_files(root / "clip")
    c = hf_config()
    llm_t = hf_tensors(c, lm_head=True, seed=7)
    llm_dir = write_folder(root / "llm", c, llm_t, shards=2)
    g = torch.Generator().manual_seed(9)
    proj_t = {"model.mm_projector.0.weight": torch.randn(32, 16, generator=g) * 0.3,
              "model.mm_projector.0.bias": torch.randn(32, generator=g) * 0.1,
              "model.mm_projector.2.weight": torch.randn(32, 32, generator=g) * 0.3,
              "model.mm_projector.2.bias": torch.randn(32, generator=g) * 0.1}
    save_file(proj_t, str(root / "mm_projector.safetensors"))
    return {"clip": clip_dir, "clip_t": clip_t, "llm": llm_dir, "llm_t": llm_t, "cfg": c,
            "proj": str(root / "mm_projector.safetensors"), "proj_t": proj_t}


@pytest.fixture(scope="module")
def llava(llava_files):
    f = llava_files
    return cmoe.LLaVA(vision.load_clip(f["clip"]), vision.load_projector(f["proj"]), cmoe.load_llama(f["llm"]),
                      pad_id=PAD).eval()


def pixels(B, seed=11):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


IMG = cmoe.IMAGE_TOKEN_ID
# right-padded training batch: image at different positions; answer tokens labelled, the rest ignored
TRAIN_IDS = [[1, 4, IMG, 9, 10, 20, 21, 22, 2], [1, IMG, 7, 8, 30, 31, 2, PAD, PAD]]
ANSWER_FROM = [5, 4]  # index in the text ids where each answer starts


def train_batch():
    ids = torch.tensor(TRAIN_IDS)
    labels = torch.full_like(ids, cmoe.IGNORE_INDEX)
    for b, a in enumerate(ANSWER_FROM):
        n = len([t for t in TRAIN_IDS[b] if t != PAD])
        labels[b, a:n] = ids[b, a:n]
    labels[0, 2] = 5  # a (bogus) label on the <image> slot itself must still be ignored
    return ids, labels


def manual_splice(E_VD, ids_row, feats_PD):
    """torch.cat of [text before <image>] + P features + [text after], in that row's own length."""
    p = ids_row.index(IMG)
    return torch.cat([E_VD[ids_row[:p]], feats_PD, E_VD[ids_row[p + 1:]]], 0)


@torch.no_grad()
def test_splice_places_image_features(llava, llava_files):
    EMB = llava_files["llm_t"]["model.embed_tokens.weight"]
    ids, labels = train_batch()
    px = pixels(2)
    feats = llava.image_features(px)
    P = feats.shape[1]
    assert P == 4
    x, valid, lab = llava.splice(ids, px, labels)
    assert x.shape == (2, ids.shape[1] - 1 + P, 32)
    for b in range(2):
        close(x[b], manual_splice(EMB, TRAIN_IDS[b], feats[b]), atol=0)
        p = TRAIN_IDS[b].index(IMG)
        want_lab = labels[b, :p].tolist() + [cmoe.IGNORE_INDEX] * P + labels[b, p + 1:].tolist()
        assert lab[b].tolist() == want_lab
        want_valid = [t != PAD for t in TRAIN_IDS[b][:p]] + [True] * P + [t != PAD for t in TRAIN_IDS[b][p + 1:]]
        assert valid[b].tolist() == want_valid
    # precomputed features give the same splice as pixels
    x2, _, _ = llava.splice(ids, feats, labels)
    close(x2, x, atol=0)


@torch.no_grad()
def test_image_features_from_raw_tensors(llava, llava_files):
    """vision -> projector chain: projector math done here from the raw mm_projector tensors."""
    px = pixels(2)
    v = llava.vision(px)
    t = llava_files["proj_t"]
    h = F.linear(v, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"])
    want = F.linear(F.gelu(h), t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
    close(llava.image_features(px), want, atol=1e-6)


@torch.no_grad()
def test_forward_logits_and_loss(llava, llava_files):
    EMB = llava_files["llm_t"]["model.embed_tokens.weight"]
    ids, labels = train_batch()
    px = pixels(2)
    logits, loss, _ = llava(ids, px, labels)
    feats = llava.image_features(px)
    total, count = 0.0, 0
    for b in range(2):
        x = manual_splice(EMB, TRAIN_IDS[b], feats[b])
        ref = ref_llama_logits(llava_files["llm_t"], llava_files["cfg"], None, embeds_BTD=x[None])[0]
        close(logits[b, :x.shape[0]], ref)  # right padding: real positions unaffected by pads after them
        # hand-built label row over the spliced sequence: answer tokens only
        p = TRAIN_IDS[b].index(IMG)
        text = TRAIN_IDS[b]
        lab = []
        for i, tok in enumerate(text):
            if i == p:
                lab += [None] * feats.shape[1]
            else:
                n = len([t for t in text if t != PAD])
                lab.append(tok if ANSWER_FROM[b] <= i < n else None)
        for s in range(len(lab) - 1):  # logits at s predict the token at s + 1
            if lab[s + 1] is not None:
                total += -float(torch.log_softmax(ref[s], -1)[lab[s + 1]])
                count += 1
    assert count == sum(len([t for t in r if t != PAD]) - a for r, a in zip(TRAIN_IDS, ANSWER_FROM))
    assert abs(float(loss) - total / count) < 1e-4


PROMPTS = [[1, 4, IMG, 9, 10], [1, IMG, 7], [3, 5, 6, 8, IMG, 11, 12, 13]]  # different lengths -> left padding


@torch.no_grad()
def greedy_reference(llava, EMB, prompt, feats_PD, n):
    """One prompt alone, no padding, no cache: re-run the whole sequence for every new token."""
    x = manual_splice(EMB, prompt, feats_PD)[None]
    out = []
    for _ in range(n):
        logits, _ = llava.llm(inputs_embeds=x)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, EMB[nxt][None, None]], 1)
    return out


@torch.no_grad()
def test_generate_cache_batch_and_stops(llava, llava_files):
    EMB = llava_files["llm_t"]["model.embed_tokens.weight"]
    px = pixels(3, seed=2)
    feats = llava.image_features(px)
    n = 6
    ref = [greedy_reference(llava, EMB, p, feats[b], n) for b, p in enumerate(PROMPTS)]
    assert len({tuple(r) for r in ref}) > 1  # the prompts really lead to different continuations
    assert llava.generate(PROMPTS, px, max_new_tokens=n) == ref  # batched, left-padded, KV-cached
    assert [llava.generate([p], px[b:b + 1], max_new_tokens=n)[0] for b, p in enumerate(PROMPTS)] == ref
    assert llava.generate(PROMPTS, feats, max_new_tokens=n) == ref  # precomputed features

    # stop ids: each row ends at its first stop token (not returned); rows never hitting it run to n
    stop = ref[0][2]
    want = [r[:r.index(stop)] if stop in r else r for r in ref]
    assert llava.generate(PROMPTS, px, max_new_tokens=n, stop_ids=[stop]) == want
    first = [r[0] for r in ref]  # every row stops at step 1 -> all empty
    assert llava.generate(PROMPTS, px, max_new_tokens=n, stop_ids=first) == [[], [], []]


def test_generation_mask_hides_padding_without_empty_rows(llava):
    """Left-padded prompts: real queries see exactly the real keys at or before them; no query row is fully
    masked (an all-False row gives NaN in some SDPA kernels, and 0 * NaN would leak through the values)."""
    ids = llava._left_pad(PROMPTS, torch.device("cpu"))
    x, valid, _ = llava.splice(ids, pixels(3))
    S = x.shape[1]
    m = llava._mask(valid, S, S + 2, 0)  # key buffer longer than the prompt, as in cached generation
    assert bool(m.any(-1).all())
    for b in range(3):
        for i in range(S):
            if valid[b, i]:
                want = [j <= i and bool(valid[b, j]) for j in range(S)] + [False, False]
                assert m[b, i].tolist() == want


@torch.no_grad()
def test_features_last_prompt_token(llava, llava_files):
    """PTL feature = final-norm hidden state at the last prompt token, per sample despite left padding."""
    EMB = llava_files["llm_t"]["model.embed_tokens.weight"]
    px = pixels(3, seed=4)
    feats = llava.image_features(px)
    f = llava.features(PROMPTS, px)
    for b, p in enumerate(PROMPTS):
        x = manual_splice(EMB, p, feats[b])[None]
        h = ref_llama_logits(llava_files["llm_t"], llava_files["cfg"], None, embeds_BTD=x, return_hidden=True)
        close(f[b], h[0, -1])



@torch.no_grad()
def test_features_mean_of_image_slots_and_instruction_tokens(llava, llava_files):
    """The richer PTL feature: [mean hidden state over the P image slots, mean over the prompt's text tokens] ("text":
    that second half alone), from the float64 reference forward of each prompt alone (no padding)."""
    EMB = llava_files["llm_t"]["model.embed_tokens.weight"]
    px = pixels(3, seed=5)
    feats = llava.image_features(px)
    f, g, t = (llava.features(PROMPTS, px, k) for k in ("mean", "max", "text"))
    P = feats.shape[1]
    assert f.shape == (3, 2 * EMB.shape[1])
    for b, p in enumerate(PROMPTS):
        h = ref_llama_logits(llava_files["llm_t"], llava_files["cfg"], None,
                             embeds_BTD=manual_splice(EMB, p, feats[b])[None], return_hidden=True)[0]
        k = p.index(IMG)
        text = [i for i in range(len(p) - 1 + P) if not k <= i < k + P]
        close(f[b], torch.cat([h[k:k + P].mean(0), h[text].mean(0)]))
        close(g[b], torch.cat([h[k:k + P].amax(0), h[text].amax(0)]))  # D-MoLE's pooling (cmoe.dmole_rep)
        close(t[b], h[text].mean(0))  # the reject gates' REJECT_FEATURE: what is asked, not what is shown
    with pytest.raises(ValueError, match="'last', 'mean' or 'image'.*'first'"):
        llava.features(PROMPTS, px, "first")

# -----------------------------------------------------------------------------------------------------------
# 5. optional parity with transformers


@pytest.mark.parametrize("tied", [True, False])
def test_llama_parity_with_transformers(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    c = hf_config(tie_word_embeddings=tied)
    t = hf_tensors(c, lm_head=not tied, seed=1)
    folder = write_folder(tmp_path / "m", c, t, shards=2)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = cmoe.load_llama(folder).eval()
    with torch.no_grad():
        close(ours(IDS)[0], hf.eval()(IDS).logits)


def test_llama_parity_transformers_saved(tmp_path):
    """A folder written by transformers itself (its current config layout, its own key names)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, vocab_size=64, rms_norm_eps=1e-6, rope_theta=50000.0,
                                  rope_scaling=dict(LLAMA3_SCALING), tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02): make the test sensitive to every weight
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "m")
    ours = cmoe.load_llama(str(tmp_path / "m")).eval()
    assert ours.cfg.rope_theta == 50000.0 and ours.cfg.rope_scaling and ours.cfg.norm_eps == 1e-6
    with torch.no_grad():
        close(ours(IDS)[0], hf.float()(IDS).logits)


@torch.no_grad()
def test_llava_parity_with_transformers(llava, llava_files):
    transformers = pytest.importorskip("transformers")
    f = llava_files
    clip, info = transformers.CLIPVisionModel.from_pretrained(f["clip"], dtype=torch.float32,
                                                              attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"]
    llm, info = transformers.LlamaForCausalLM.from_pretrained(f["llm"], dtype=torch.float32,
                                                              attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    EMB = f["llm_t"]["model.embed_tokens.weight"]
    ids, _ = train_batch()
    px = pixels(2, seed=8)
    v = clip.eval()(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    t = f["proj_t"]
    feats = F.linear(F.gelu(F.linear(v, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"])),
                     t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
    ours, _, _ = llava(ids, px)
    for b in range(2):
        x = manual_splice(EMB, TRAIN_IDS[b], feats[b])
        ref = llm.eval()(inputs_embeds=x[None]).logits[0]
        close(ours[b, :x.shape[0]], ref)

"""Tests of the patch-encoder registry (models/encoders).

Big models are built on the ``meta`` device (parameter counts and output shapes without
memory); every code path runs on CPU through the tiny registered encoders and CTransPath.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.encoders import (
    Encoder,
    UnknownEncoderError,
    WeightsError,
    autocast_context,
    count_parameters,
    create_encoder,
    flops_per_patch,
    get_spec,
    list_encoders,
    prepare_for_inference,
    read_state_dict,
    resolve_device,
    resolve_precision,
)

REAL = ["ctranspath", "virchow", "virchow2", "uni", "uni2-h", "h-optimus-0", "resnet50-trunc"]
TINY = ["tiny-vit", "tiny-swin", "tiny-resnet"]

# Exact counts with timm 1.0.31 (pin the architectures; the published figures are in the specs).
EXACT_PARAMS = {
    "ctranspath": 27_520_038,
    "virchow": 631_229_184,
    "virchow2": 631_239_424,
    "uni": 303_350_784,
    "uni2-h": 681_394_176,
    "h-optimus-0": 1_134_774_272,
    "resnet50-trunc": 8_543_296,
}
EMBED_DIMS = {
    "ctranspath": 768,
    "virchow": 2560,
    "virchow2": 2560,
    "uni": 1024,
    "uni2-h": 1536,
    "h-optimus-0": 1536,
    "resnet50-trunc": 1024,
}


@functools.cache
def _meta_encoder(name: str):
    """Encoder built on the meta device (shapes and counts only), shared between tests."""
    return create_encoder(name, weights="random", device="meta")


def _patches(n: int = 3, size: int = 48, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _perturb_(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter and BN statistic values unlike the seeded random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point() or name.endswith("attn_mask"):
                continue  # integer buffers, and masks that are fixed by the geometry
            noise = torch.randn(tensor.shape, generator=gen) * 0.05
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.add_(noise)


# --- registry -------------------------------------------------------------------------


def test_registry_lists_every_entry():
    names = list_encoders()
    assert set(REAL + TINY) <= set(names)
    assert names == sorted(names)
    assert not set(TINY) & set(list_encoders(include_test=False))


def test_register_and_validate_specs():
    from models.encoders import register_encoder
    from models.encoders.specs import EncoderSpec

    spec = get_spec("tiny-resnet")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(spec)
    with pytest.raises(ValueError, match="needs a ViT"):
        EncoderSpec(**{**spec.__dict__, "name": "bad", "pooling": "cls"})
    with pytest.raises(ValueError, match="unknown pooling"):
        EncoderSpec(**{**spec.__dict__, "name": "bad", "pooling": "max"})


def test_unknown_name_lists_valid_choices():
    with pytest.raises(UnknownEncoderError) as info:
        create_encoder("virchow3", weights="random")
    msg = str(info.value)
    assert "virchow3" in msg and "Did you mean 'virchow" in msg
    for name in REAL:
        assert name in msg


@pytest.mark.parametrize("name", REAL)
def test_big_encoder_params_and_dim_on_meta(name):
    spec = get_spec(name)
    enc = _meta_encoder(name)
    n = count_parameters(enc.trunk)
    assert n == EXACT_PARAMS[name]
    assert abs(n - spec.param_count) / spec.param_count < 0.005, (name, n, spec.param_count)
    assert enc.embed_dim == spec.embed_dim == EMBED_DIMS[name]
    out = enc(torch.empty(2, 3, spec.input_size, spec.input_size, device="meta"))
    assert tuple(out.shape) == (2, EMBED_DIMS[name])


def test_flops_per_patch_counts_on_meta():
    # ViT-L/16 at 224: 24 blocks x (12*D^2*T + 2*T^2*D) MACs, T = 197 tokens, D = 1024, x2 FLOPs
    tokens, dim = 197, 1024
    macs = 24 * (12 * dim * dim * tokens + 2 * tokens * tokens * dim) + 3 * 16 * 16 * dim * 196
    assert flops_per_patch("uni") == pytest.approx(2 * macs, rel=0.01)
    assert flops_per_patch("ctranspath") == pytest.approx(9.0e9, rel=0.02)


def test_spec_facts():
    hopt = get_spec("h-optimus-0")
    assert hopt.mean == (0.707223, 0.578729, 0.703617)
    assert hopt.std == (0.211883, 0.230117, 0.177517)
    assert get_spec("ctranspath").native_mpp == 1.0 and get_spec("ctranspath").license == "GPL-3.0"
    assert get_spec("virchow").native_mpp == 0.5
    assert get_spec("virchow").hf_hub_id == "hf-hub:paige-ai/Virchow"
    assert get_spec("uni").hf_hub_id == "hf-hub:MahmoodLab/UNI"
    assert get_spec("h-optimus-0").hf_hub_id == "hf-hub:bioptimus/H-optimus-0"
    assert _meta_encoder("virchow").num_prefix_tokens == 1
    assert _meta_encoder("virchow2").num_prefix_tokens == 5
    assert _meta_encoder("uni2-h").num_prefix_tokens == 9
    # the spec describes itself as JSON, classes by dotted name
    virchow = get_spec("virchow").to_dict()
    json.dumps(virchow)
    assert virchow["timm_kwargs"]["mlp_layer"] == (
        "partial(timm.layers.mlp.GluMlp, act_layer=torch.nn.modules.activation.SiLU, gate_last=False)"
    )  # SwiGLUPacked
    assert virchow["pooling"] == "cls+mean"


# --- building and running on CPU ------------------------------------------------------------


FULL_SIZE_SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in ("ctranspath", "resnet50-trunc")]


@pytest.mark.parametrize("name", [*TINY, *FULL_SIZE_SLOW])
def test_encoder_runs_on_cpu(name):
    enc = create_encoder(name, weights="random", device="cpu")
    assert isinstance(enc, Encoder) and not enc.training
    assert enc.weights_id == "random"
    assert all(not p.requires_grad for p in enc.parameters())
    x = enc.preprocess(_patches(3, 40))
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, 3, enc.input_size, enc.input_size)
    with torch.inference_mode():
        out = enc(x)
    assert tuple(out.shape) == (3, enc.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # different patches, different features


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = create_encoder("tiny-vit", weights="random")
    after = torch.rand(1)
    b = create_encoder("tiny-vit", weights="random", device="auto")
    assert torch.equal(after, expected_next)
    x = _patches(2, 32)
    assert torch.equal(a.encode(x).cpu(), b.encode(x).cpu())


def test_preprocess_normalises_with_spec_mean_std():
    enc = create_encoder("tiny-vit", weights="random")
    spec = enc.spec
    img = _patches(2, spec.input_size)  # input size: no resize
    got = enc.preprocess(img)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    want = (img.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # numpy input is accepted too
    torch.testing.assert_close(enc.preprocess(img.numpy()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-swin"])  # bicubic, bilinear
def test_preprocess_resizes_antialiased(name):
    enc = create_encoder(name, weights="random")
    s = enc.input_size
    flat = torch.full((1, 4 * s, 4 * s, 3), 200, dtype=torch.uint8)
    flat[..., 1] = 10
    got = enc.preprocess(flat)
    assert tuple(got.shape) == (1, 3, s, s)
    want = (torch.tensor([200.0, 10.0, 200.0]) / 255 - torch.tensor(enc.spec.mean)) / torch.tensor(
        enc.spec.std
    )
    torch.testing.assert_close(got[0].mean(dim=(1, 2)), want, rtol=1e-4, atol=1e-4)
    # a one-pixel checkerboard averages to grey when downsampled 4x with antialiasing
    board = ((torch.arange(4 * s)[:, None] + torch.arange(4 * s)[None, :]) % 2 * 255).to(
        torch.uint8
    )
    board = board[None, :, :, None].expand(1, 4 * s, 4 * s, 3).contiguous()
    grey = enc.preprocess(board)[0, 0] * enc.spec.std[0] + enc.spec.mean[0]
    assert float(grey.min()) > 0.4 and float(grey.max()) < 0.6


def test_cpu_uint8_resize_matches_float_resize_on_smooth_images():
    enc = create_encoder("tiny-swin", weights="random")  # bilinear
    s = enc.input_size
    yy, xx = torch.meshgrid(torch.arange(3 * s), torch.arange(3 * s), indexing="ij")
    smooth = torch.stack([xx * 2, yy * 2, (xx + yy)], dim=-1).clamp(0, 255).to(torch.uint8)[None]
    got = enc.preprocess(smooth)
    ref = F.interpolate(
        smooth.permute(0, 3, 1, 2).float(), size=(s, s), mode="bilinear", antialias=True
    )
    ref = (ref / 255 - torch.tensor(enc.spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        enc.spec.std
    ).view(1, 3, 1, 1)
    # within one grey level (uint8 rounding), in normalised units
    torch.testing.assert_close(got, ref, rtol=0, atol=1.01 / 255 / min(enc.spec.std))


def test_preprocess_rejects_wrong_input():
    enc = create_encoder("tiny-resnet", weights="random")
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# --- pooling --------------------------------------------------------------------------


def _cls_and_mean_by_hand(tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
    cls_token = tokens[:, 0]
    patch = [tokens[:, i] for i in range(n_prefix, tokens.shape[1])]
    mean = sum(patch) / len(patch)
    return torch.cat([cls_token, mean], dim=-1)


def test_cls_plus_mean_pooling_token_by_token_excludes_registers():
    enc = create_encoder("tiny-vit", weights="random")
    _perturb_(enc.trunk)
    assert enc.trunk.num_reg_tokens == 2 and enc.num_prefix_tokens == 3
    x = enc.preprocess(_patches(2, 32))
    with torch.inference_mode():
        tokens = enc.trunk.forward_features(x)
        out = enc(x)
    n_patches = (32 // 8) ** 2
    assert tokens.shape[1] == 3 + n_patches
    torch.testing.assert_close(out, _cls_and_mean_by_hand(tokens, 3), rtol=1e-5, atol=1e-6)
    with_registers = _cls_and_mean_by_hand(tokens, 1)
    assert not torch.allclose(out, with_registers, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["virchow", "virchow2"])
def test_virchow_pooling_token_by_token_full_size(name):
    psutil = pytest.importorskip("psutil")
    if psutil.virtual_memory().available < 8e9:
        pytest.skip("needs ~8 GB free memory for a 631 M-parameter model")
    enc = create_encoder(name, weights="random")
    x = enc.preprocess(_patches(1, 224))
    with torch.inference_mode():
        tokens = enc.trunk.forward_features(x)
        out = enc(x)
    n_prefix = 1 + (4 if name == "virchow2" else 0)
    assert tokens.shape == (1, n_prefix + 256, 1280)
    assert out.shape == (1, 2560)
    torch.testing.assert_close(out, _cls_and_mean_by_hand(tokens, n_prefix), rtol=1e-4, atol=1e-5)


def test_cls_pooling_is_the_class_token():
    enc = create_encoder("tiny-vit", weights="random")
    spec = get_spec("uni")
    assert spec.pooling == "cls"
    # a ViT built with the "cls" pooling returns token 0 of forward_features
    from models.encoders import build_trunk
    from models.encoders.specs import EncoderSpec

    cls_spec = EncoderSpec(
        **{**enc.spec.__dict__, "name": "tiny-vit-cls", "pooling": "cls", "embed_dim": 32}
    )
    trunk = build_trunk(cls_spec).eval()
    x = enc.preprocess(_patches(2, 32))
    with torch.inference_mode():
        torch.testing.assert_close(trunk(x), trunk.forward_features(x)[:, 0])


# --- weights --------------------------------------------------------------------------


def test_weights_none_says_what_to_pass():
    with pytest.raises(WeightsError) as info:
        create_encoder("uni")
    msg = str(info.value)
    assert "random" in msg and "hf-hub:MahmoodLab/UNI" in msg and "local file" in msg


def test_missing_weight_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        create_encoder("tiny-vit", weights=tmp_path / "nope.pth")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported weight file type"):
        create_encoder("tiny-vit", weights=bad)


# --- CTransPath as released: an independent timm-0.5.4-style Swin with the conv stem -------
# Written from the Swin paper / reference code (microsoft/Swin-Transformer, MIT), which timm
# 0.5.4 copied: downsample at the END of each stage, persistent relative_position_index and
# attn_mask buffers, tokens as (B, L, C), a Linear head. Its state dict has the key layout of
# the released ctranspath.pth; the encoder must load it and compute the same features.


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _unwindows(win: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = win.shape[0] // ((h // ws) * (w // ws))
    x = win.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class _OldAttention(torch.nn.Module):
    def __init__(self, dim: int, ws: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = torch.nn.Parameter(
            torch.zeros((2 * ws - 1) ** 2, heads)
        )
        grid = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        rel = (grid.flatten(1)[:, :, None] - grid.flatten(1)[:, None, :]).permute(1, 2, 0)
        rel = rel + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask[None, :, None]).view(
                -1, self.heads, n, n
            )
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class _OldBlock(torch.nn.Module):
    def __init__(self, dim: int, res: int, heads: int, ws: int, shift: int) -> None:
        super().__init__()
        if res <= ws:
            ws, shift = res, 0
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = _OldAttention(dim, ws, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential()
        self.mlp.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.mlp.act = torch.nn.GELU()
        self.mlp.fc2 = torch.nn.Linear(4 * dim, dim)
        mask = None
        if shift:
            img = torch.zeros(1, res, res, 1)
            cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for i, (hs, wsl) in enumerate((a, b) for a in cuts for b in cuts):
                img[:, hs, wsl] = i
            win = _windows(img, ws).squeeze(-1)
            diff = win[:, None, :] - win[:, :, None]
            mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        h = _unwindows(self.attn(_windows(h, self.ws), self.attn_mask), self.ws, self.res, self.res)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(b, -1, c)
        return x + self.mlp(self.norm2(x))


class _OldPatchMerging(torch.nn.Module):
    def __init__(self, dim: int, res: int) -> None:
        super().__init__()
        self.res = res
        self.reduction = torch.nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = torch.nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, -1).view(b, -1, 4 * c)))


class _OldCTransPath(torch.nn.Module):
    """timm-0.5.4 SwinTransformer(embed_layer=ConvStem), as CTransPath was trained."""

    def __init__(self, img: int, dim: int, depths, heads, ws: int) -> None:
        super().__init__()
        stem, cin, cout = [], 3, dim // 8
        for _ in range(2):
            stem += [
                torch.nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(),
            ]
            cin, cout = cout, cout * 2
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Sequential(*stem, torch.nn.Conv2d(cin, dim, 1))
        self.patch_embed.norm = torch.nn.LayerNorm(dim)
        self.layers = torch.nn.ModuleList()
        res = img // 4
        for i, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
            stage = torch.nn.Module()
            stage.blocks = torch.nn.ModuleList(
                _OldBlock(dim, res, nh, ws, 0 if j % 2 == 0 else ws // 2) for j in range(depth)
            )
            last = i == len(depths) - 1
            stage.downsample = None if last else _OldPatchMerging(dim, res)
            self.layers.append(stage)
            if not last:
                dim, res = dim * 2, res // 2
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = self.patch_embed.norm(x)
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return self.norm(x).mean(dim=1)  # avgpool over tokens; the head is not used


_OLD_CONFIGS = {
    "tiny-swin": {"img": 32, "dim": 16, "depths": (2, 2), "heads": (1, 2), "ws": 4},
    "ctranspath": {"img": 224, "dim": 96, "depths": (2, 2, 6, 2), "heads": (3, 6, 12, 24), "ws": 7},
}


@pytest.mark.parametrize("name", ["tiny-swin", pytest.param("ctranspath", marks=pytest.mark.slow)])
def test_ctranspath_loads_original_checkpoint_layout(tmp_path, name):
    old = _OldCTransPath(**_OLD_CONFIGS[name])
    _perturb_(old, seed=3)
    old.eval()
    state = old.state_dict()
    # the layout of the released file
    assert "layers.0.downsample.reduction.weight" in state
    assert f"layers.{len(old.layers) - 1}.downsample.reduction.weight" not in state
    assert any(k.endswith("relative_position_index") for k in state)
    assert any(k.endswith("attn_mask") for k in state)
    assert {"patch_embed.proj.0.weight", "patch_embed.proj.6.bias", "head.weight"} <= set(state)
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": state}, path)

    enc = create_encoder(name, weights=path)
    assert enc.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.inference_mode():
        x = enc.preprocess(_patches(2, 2 * enc.input_size))
        want = old.features(x)
        got = enc(x)
    assert got.shape == want.shape == (2, enc.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fresh = create_encoder(name, weights="random")
    with torch.inference_mode():
        assert not torch.allclose(fresh(x), want, atol=1e-3)  # the weights came from the file


def test_checkpoint_mismatch_lists_keys(tmp_path):
    source = create_encoder("tiny-swin", weights="random")
    state = dict(source.trunk.state_dict())
    del state["norm.weight"]
    state["layers.0.blocks.0.extra_thing"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError) as info:
        create_encoder("tiny-swin", weights=path)
    msg = str(info.value)
    assert str(path) in msg and "missing keys: norm.weight" in msg
    assert "unexpected keys: layers.0.blocks.0.extra_thing" in msg and "Fix:" in msg


def test_checkpoint_shape_mismatch_is_weights_error(tmp_path):
    state = dict(create_encoder("tiny-vit", weights="random").trunk.state_dict())
    state["cls_token"] = torch.zeros(1, 1, 99)
    path = tmp_path / "shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="do not fit encoder 'tiny-vit'"):
        create_encoder("tiny-vit", weights=path)


def test_hf_layout_folder_with_safetensors(tmp_path):
    source = create_encoder("tiny-vit", weights="random")
    _perturb_(source.trunk)
    folder = tmp_path / "tiny-vit-hf"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in source.trunk.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    enc = create_encoder("tiny-vit", weights=folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert enc.weights_id == f"sha256:{digest}"
    x = _patches(2, 32)
    torch.testing.assert_close(enc.encode(x), source.encode(x), rtol=0, atol=0)
    # same bytes as a plain file: same identity
    assert (
        create_encoder("tiny-vit", weights=folder / "model.safetensors").weights_id
        == enc.weights_id
    )


def test_bin_file_with_state_dict_wrapper_and_module_prefix(tmp_path):
    source = create_encoder("tiny-resnet", weights="random")
    _perturb_(source.trunk)
    state = {f"module.{k}": v for k, v in source.trunk.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 64)  # classifier of the full ResNet: dropped
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"state_dict": state, "epoch": torch.tensor(3)}, folder / "pytorch_model.bin")
    assert "module.fc.weight" not in read_state_dict(folder / "pytorch_model.bin")
    assert "fc.weight" in read_state_dict(folder / "pytorch_model.bin")
    enc = create_encoder("tiny-resnet", weights=folder)
    x = _patches(2, 32)
    torch.testing.assert_close(enc.encode(x), source.encode(x), rtol=0, atol=0)


def test_pickled_objects_are_refused(tmp_path):
    state = create_encoder("tiny-resnet", weights="random").trunk.state_dict()
    path = tmp_path / "with_args.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="cannot read weights") as info:
        create_encoder("tiny-resnet", weights=path)
    assert "state dict" in info.value.fix


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="not a state dict"):
        create_encoder("tiny-resnet", weights=path)


def test_hf_hub_offline_names_cache_and_local_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsError) as info:
        create_encoder("uni", weights="hf-hub:MahmoodLab/UNI")
    err = info.value
    assert err.source == "hf-hub:MahmoodLab/UNI"
    assert str(cache) in str(err) and "offline" in err.reason
    assert "local weight file or folder" in err.fix
    assert err.__cause__ is not None


def test_hf_hub_loads_from_local_cache_offline(tmp_path, monkeypatch):
    """The hub path through timm, served from a Hugging Face cache (no network)."""
    from huggingface_hub import constants

    source = create_encoder("tiny-vit", weights="random")
    _perturb_(source.trunk)
    cache = tmp_path / "hf-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--slidepipe--tiny-vit"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    args = {k: v for k, v in source.spec.timm_kwargs.items() if not callable(v)}
    config = {
        "architecture": source.spec.arch,
        "num_classes": 0,
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": 0},
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in source.trunk.state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    enc = create_encoder("tiny-vit", weights="hf-hub:slidepipe/tiny-vit")
    digest = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert enc.weights_id == f"sha256:{digest}"
    x = _patches(2, 32)
    torch.testing.assert_close(enc.encode(x), source.encode(x), rtol=0, atol=0)


def test_weights_error_pickles():
    err = WeightsError("x.pth", "broken", "replace it")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "x.pth: broken. Fix: replace it"


def test_specs_and_encoders_pickle():
    spec = get_spec("virchow2")
    assert pickle.loads(pickle.dumps(spec)) is spec
    enc = create_encoder("tiny-swin", weights="random")
    again = pickle.loads(pickle.dumps(enc))
    assert again.spec is enc.spec and again.weights_id == "random"
    x = _patches(2, 32)
    torch.testing.assert_close(again.encode(x), enc.encode(x), rtol=0, atol=0)


def test_identity_is_json():
    enc = create_encoder("tiny-swin", weights="random")
    ident = enc.identity()
    assert ident["encoder"] == "tiny-swin" and ident["weights_id"] == "random"
    assert ident["embed_dim"] == 32 and ident["pooling"] == "mean"
    json.dumps(ident)


# --- device and precision ---------------------------------------------------------------


def test_device_and_precision_helpers():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


def test_autocast_bf16_on_cpu_close_to_fp32():
    enc = create_encoder("tiny-vit", weights="random")
    x = enc.preprocess(_patches(2, 32))
    with torch.inference_mode():
        with autocast_context("cpu", "fp32") as dtype:
            ref = enc(x)
        assert dtype == torch.float32 and ref.dtype == torch.float32
        with autocast_context("cpu", "bf16") as dtype:
            low = enc(x)
    assert dtype == torch.bfloat16
    assert not torch.equal(low.float(), ref)  # bf16 matmuls really ran
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_channels_last_for_cnns_keeps_outputs():
    enc = create_encoder("tiny-resnet", weights="random")
    x = _patches(2, 32)
    ref = enc.encode(x)
    prepare_for_inference(enc)
    assert enc.channels_last
    assert enc.preprocess(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(enc.encode(x), ref, rtol=1e-5, atol=1e-5)
    vit = prepare_for_inference(create_encoder("tiny-vit", weights="random"))
    assert not vit.channels_last


@pytest.mark.slow
def test_compiled_trunk_matches_eager():
    enc = create_encoder("tiny-resnet", weights="random")
    x = _patches(2, 32)
    ref = enc.encode(x)
    prepare_for_inference(enc, compile=True)
    torch.testing.assert_close(enc.encode(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_preprocess_and_bf16_forward():
    enc = create_encoder("tiny-vit", weights="random", device="cuda")
    x = _patches(4, 48).pin_memory()
    with torch.inference_mode(), autocast_context("cuda") as dtype:
        out = enc(enc.preprocess(x))
    assert out.device.type == "cuda" and out.shape == (4, 64) and dtype == torch.bfloat16

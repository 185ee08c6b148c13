"""Tests of the patch-encoder registry (models/encoders).

Big models are built on the ``meta`` device (parameter counts and output shapes without
memory); every code path runs on CPU through the tiny registered encoders and CTransPath.
"""

from __future__ import annotations

import argparse
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
    to_legacy_swin_state_dict,
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


def _patches(n: int = 3, size: int = 48, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _perturb_(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter and BN statistic values unlike the seeded random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
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
    enc = create_encoder(name, weights="random", device="meta")
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
    assert create_encoder("virchow", weights="random", device="meta").num_prefix_tokens == 1
    assert create_encoder("virchow2", weights="random", device="meta").num_prefix_tokens == 5
    assert create_encoder("uni2-h", weights="random", device="meta").num_prefix_tokens == 9
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


def _legacy_ctranspath_checkpoint(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict in the timm-0.5.4 layout of the released ctranspath.pth."""
    legacy = to_legacy_swin_state_dict(trunk.state_dict())
    for name, buf in trunk.named_buffers():
        if name.endswith("relative_position_index"):  # persistent in timm 0.5.4
            legacy[name] = buf.clone()
    for i, stage in enumerate(trunk.layers):
        for j, block in enumerate(stage.blocks):
            if getattr(block, "shift_size", (0, 0)) != (0, 0) and max(block.shift_size) > 0:
                n_win = (stage.blocks[0].input_resolution[0] // block.window_size[0]) ** 2
                area = block.window_size[0] * block.window_size[1]
                legacy[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(n_win, area, area)
    num_features = trunk.num_features
    legacy["head.weight"] = torch.randn(1000, num_features)
    legacy["head.bias"] = torch.zeros(1000)
    return legacy


@pytest.mark.parametrize("name", ["tiny-swin", pytest.param("ctranspath", marks=pytest.mark.slow)])
def test_ctranspath_loads_legacy_checkpoint(tmp_path, name):
    source = create_encoder(name, weights="random")
    _perturb_(source.trunk)
    legacy = _legacy_ctranspath_checkpoint(source.trunk)
    last = len(source.trunk.layers) - 1
    assert "layers.0.downsample.reduction.weight" in legacy  # old layout: stage 0 downsamples
    assert f"layers.{last}.downsample.reduction.weight" not in legacy
    assert any(k.endswith("attn_mask") for k in legacy)
    assert "patch_embed.proj.0.weight" in legacy and "patch_embed.proj.6.bias" in legacy
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": legacy}, path)

    loaded = create_encoder(name, weights=path)
    assert loaded.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    x = _patches(2, 64)
    want = source.encode(x)
    torch.testing.assert_close(loaded.encode(x), want, rtol=0, atol=0)
    fresh = create_encoder(name, weights="random").encode(x)
    assert not torch.allclose(fresh, want, atol=1e-4)  # the weights really came from the file


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

"""The registered encoders: foundation models for pathology, the CLAM baseline, tiny test models.

Parameter counts are the published ones; ``tests/test_encoders.py`` counts each trunk on
the ``meta`` device and checks it is within 0.5 %.
"""

from __future__ import annotations

import re

from timm.layers import SwiGLUPacked
from torch import nn

from .ctranspath import ConvStem, remap_ctranspath_state_dict
from .specs import EncoderSpec, register_encoder

_GATED = (
    "request access on the model page, log in with `hf auth login` (or set HF_TOKEN), "
    "then pass `--weights hf-hub:{hub}`; or download it and pass the local file or folder"
)


def _drop_keys(pattern: str):
    regex = re.compile(pattern)

    def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
        return {k: v for k, v in state_dict.items() if not regex.match(k)}

    checkpoint_filter.__qualname__ = f"drop_keys({pattern!r})"
    return checkpoint_filter


_DROP_HEAD = _drop_keys(r"^head\.")
_DROP_RESNET_TAIL = _drop_keys(r"^(layer4|fc)\.")

_VIRCHOW_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "mlp_layer": SwiGLUPacked,
    "act_layer": nn.SiLU,
}

register_encoder(
    EncoderSpec(
        name="ctranspath",
        arch="swin_tiny_patch4_window7_224",
        family="swin",
        pooling="mean",
        embed_dim=768,
        input_size=224,
        native_mpp=1.0,
        license="GPL-3.0",
        param_count=27_500_000,  # exact: 27,520,038 (timm 1.0.31, incl. conv stem)
        timm_kwargs={"embed_layer": ConvStem},
        interpolation="bilinear",
        checkpoint_filter=remap_ctranspath_state_dict,
        weights_hint=(
            "download ctranspath.pth from https://github.com/Xiyue-Wang/TransPath and pass its path"
        ),
        reference="Wang et al., Medical Image Analysis 2022 (CTransPath)",
    )
)

register_encoder(
    EncoderSpec(
        name="virchow",
        arch="vit_huge_patch14_224",
        family="vit",
        pooling="cls+mean",
        embed_dim=2560,
        input_size=224,
        native_mpp=0.5,
        license="CC-BY-NC-ND-4.0",
        param_count=632_000_000,  # paper: 632 M; exact: 631,229,184
        timm_kwargs=_VIRCHOW_KWARGS,
        interpolation="bicubic",
        hf_hub_id="hf-hub:paige-ai/Virchow",
        checkpoint_filter=_DROP_HEAD,
        weights_hint=_GATED.format(hub="paige-ai/Virchow"),
        reference="Vorontsov et al., Nature Medicine 2024 (Virchow)",
    )
)

register_encoder(
    EncoderSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        family="vit",
        pooling="cls+mean",
        embed_dim=2560,
        input_size=224,
        native_mpp=0.5,
        license="CC-BY-NC-ND-4.0",
        param_count=632_000_000,  # paper: 632 M; exact: 631,239,424 (+4 registers, +4 pos-embeds)
        timm_kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4, "dynamic_img_size": True},
        interpolation="bicubic",
        hf_hub_id="hf-hub:paige-ai/Virchow2",
        checkpoint_filter=_DROP_HEAD,
        weights_hint=_GATED.format(hub="paige-ai/Virchow2"),
        reference="Zimmermann et al., arXiv:2408.00738 (Virchow2)",
    )
)

register_encoder(
    EncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        family="vit",
        pooling="cls",
        embed_dim=1024,
        input_size=224,
        native_mpp=0.5,
        license="CC-BY-NC-ND-4.0",
        param_count=303_000_000,  # exact: 303,350,784
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        interpolation="bilinear",
        hf_hub_id="hf-hub:MahmoodLab/UNI",
        checkpoint_filter=_DROP_HEAD,
        weights_hint=_GATED.format(hub="MahmoodLab/UNI"),
        reference="Chen et al., Nature Medicine 2024 (UNI)",
    )
)

register_encoder(
    EncoderSpec(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        family="vit",
        pooling="cls",
        embed_dim=1536,
        input_size=224,
        native_mpp=0.5,
        license="CC-BY-NC-ND-4.0",
        param_count=681_000_000,  # exact: 681,394,176
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "embed_dim": 1536,
            "init_values": 1e-5,
            "mlp_ratio": 2.66667 * 2,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 8,
            "no_embed_class": True,
            "dynamic_img_size": True,
        },
        interpolation="bilinear",
        hf_hub_id="hf-hub:MahmoodLab/UNI2-h",
        checkpoint_filter=_DROP_HEAD,
        weights_hint=_GATED.format(hub="MahmoodLab/UNI2-h"),
        reference="MahmoodLab UNI2-h model card (2025)",
    )
)

register_encoder(
    EncoderSpec(
        name="h-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        family="vit",
        pooling="cls",
        embed_dim=1536,
        input_size=224,
        native_mpp=0.5,
        license="Apache-2.0",
        param_count=1_130_000_000,  # exact: 1,134,774,272
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        interpolation="bicubic",
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        hf_hub_id="hf-hub:bioptimus/H-optimus-0",
        checkpoint_filter=_DROP_HEAD,
        weights_hint=_GATED.format(hub="bioptimus/H-optimus-0"),
        reference="Saillard et al., Bioptimus 2024 (H-optimus-0)",
    )
)

register_encoder(
    EncoderSpec(
        name="resnet50-trunc",
        arch="resnet50",
        family="cnn",
        pooling="avgpool",
        embed_dim=1024,
        input_size=224,
        native_mpp=0.5,
        license="BSD-3-Clause",
        param_count=8_543_296,  # ResNet-50 stem + layer1-3 (CLAM's truncated ResNet)
        truncate_after="layer3",
        interpolation="bilinear",
        hf_hub_id="hf-hub:timm/resnet50.tv_in1k",
        checkpoint_filter=_DROP_RESNET_TAIL,
        weights_hint="pass `--weights hf-hub:timm/resnet50.tv_in1k` (ImageNet, as in CLAM)",
        reference="Lu et al., Nature BME 2021 (CLAM): ImageNet ResNet-50 cut after layer 3",
    )
)

# --- tiny test encoders: same code paths as the real ones, build in milliseconds ------------

register_encoder(
    EncoderSpec(
        name="tiny-vit",
        arch="vit_small_patch16_224",
        family="vit",
        pooling="cls+mean",
        embed_dim=64,
        input_size=32,
        native_mpp=0.5,
        license="Apache-2.0",
        param_count=None,
        timm_kwargs={
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "init_values": 1e-5,
            "mlp_ratio": 2.0,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 2,
            "dynamic_img_size": True,
        },
        interpolation="bicubic",
        checkpoint_filter=_DROP_HEAD,
        reference="test encoder shaped like Virchow2 (CLS + mean of patch tokens, registers)",
        test_only=True,
    )
)

register_encoder(
    EncoderSpec(
        name="tiny-swin",
        arch="swin_tiny_patch4_window7_224",
        family="swin",
        pooling="mean",
        embed_dim=32,
        input_size=32,
        native_mpp=1.0,
        license="Apache-2.0",
        param_count=None,
        timm_kwargs={
            "img_size": 32,
            "embed_dim": 16,
            "depths": (2, 2),  # block 1 of stage 0 is shifted: exercises attn_mask
            "num_heads": (1, 2),
            "window_size": 4,
            "embed_layer": ConvStem,
        },
        interpolation="bilinear",
        checkpoint_filter=remap_ctranspath_state_dict,
        reference="test encoder shaped like CTransPath (Swin with the conv stem)",
        test_only=True,
    )
)

register_encoder(
    EncoderSpec(
        name="tiny-resnet",
        arch="resnet18",
        family="cnn",
        pooling="avgpool",
        embed_dim=32,
        input_size=32,
        native_mpp=0.5,
        license="Apache-2.0",
        param_count=None,
        timm_kwargs={"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8},
        truncate_after="layer3",
        interpolation="bilinear",
        checkpoint_filter=_DROP_RESNET_TAIL,
        reference="test encoder shaped like resnet50-trunc (cut after layer 3)",
        test_only=True,
    )
)

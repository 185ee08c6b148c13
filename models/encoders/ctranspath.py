"""CTransPath: the convolutional stem and the remap of its timm-0.5.4 checkpoint.

CTransPath (Wang et al., Medical Image Analysis 2022, https://github.com/Xiyue-Wang/TransPath)
is a Swin-T whose 4x4 patch embedding is replaced by two stride-2 3x3 convolutions
(BatchNorm + ReLU) and a 1x1 projection. Its released ``ctranspath.pth`` holds, under key
``model``, a state dict from timm 0.5.4, where each stage ended with its downsample
layer; modern timm starts the *next* stage with it, and no longer stores the
``relative_position_index`` / ``attn_mask`` buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConvStem(nn.Module):
    """CTransPath's patch embedding, with the interface of timm's ``PatchEmbed``.

    Two ``Conv3x3(stride 2) + BN + ReLU`` blocks (``embed_dim/8`` then ``embed_dim/4``
    channels) and a 1x1 projection to ``embed_dim``; output NHWC ``(B, H/4, W/4, C)`` as
    modern timm Swin expects (``output_fmt="NCHW"`` or ``flatten=True`` give the others).
    Parameter names (``proj.0``, ``proj.1`` ... ``proj.6``, ``norm``) match the original.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        flatten: bool = False,
        output_fmt: str = "NHWC",
        strict_img_size: bool = True,
        device=None,
        dtype=None,
        **_: object,
    ) -> None:
        super().__init__()
        patch_size = _pair(patch_size)
        if patch_size != (4, 4):
            raise ValueError(f"ConvStem downsamples by 4; got patch_size={patch_size}")
        if embed_dim % 8:
            raise ValueError(f"ConvStem needs embed_dim divisible by 8; got {embed_dim}")
        self.patch_size = patch_size
        self.flatten = flatten
        self.output_fmt = output_fmt
        self.strict_img_size = strict_img_size
        self.set_input_size(img_size=img_size)
        dd = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(out_dim, **dd),
                nn.ReLU(inplace=True),
            ]
            in_dim, out_dim = out_dim, out_dim * 2
        layers.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        """Update the expected input size (called by timm's ``set_input_size``)."""
        if patch_size is not None and _pair(patch_size) != (4, 4):
            raise ValueError("ConvStem downsamples by 4; the patch size cannot change")
        if img_size is not None:
            self.img_size = _pair(img_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if self.strict_img_size and (h, w) != self.img_size:
            raise ValueError(f"input size {(h, w)} does not match the model's {self.img_size}")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return self.norm(x)


def remap_ctranspath_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Convert a CTransPath (timm 0.5.4) state dict to the key layout of modern timm.

    Uses timm's Swin ``checkpoint_filter_fn`` (drops ``relative_position_index`` and
    ``attn_mask`` buffers, moves ``layers.i.downsample`` to ``layers.{i+1}``), then drops
    the classifier (``head.*``), which the headless encoder does not have. A state dict
    already in the modern layout passes through unchanged (apart from ``head.*``).
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    out = checkpoint_filter_fn(dict(state_dict), model)
    return {k: v for k, v in out.items() if not k.startswith("head.")}

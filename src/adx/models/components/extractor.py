"""Feature extractor on a timm CNN (maps chosen by stride) or Vision Transformer (patch tokens of chosen
blocks as maps), frozen or trainable, with offline weights (weights.py) and explicit input normalisation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import Conv2dSame
from torch import Tensor, nn

from adx.models.components.weights import PENDING, UNRECORDED, is_restoring, load_pretrained, structure_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = ("backbone", "imagenet", "none")


class BackboneError(ValueError):
    """A backbone cannot serve the requested feature maps."""


class InputSizeError(BackboneError):
    """An image size a Vision Transformer cannot cut into whole patches."""


def normalization_stats(
    normalization: str, pretrained_cfg: dict[str, Any]
) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel for a ``normalization`` name or ``"m1,m2,m3/s1,s2,s3"``."""
    if normalization == "backbone":
        return list(pretrained_cfg.get("mean", IMAGENET_MEAN)), list(pretrained_cfg.get("std", IMAGENET_STD))
    if normalization == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if normalization == "none":
        return [0.0] * 3, [1.0] * 3
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in normalization.split("/"))
    except ValueError:
        mean = std = []
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise BackboneError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)} or 'm1,m2,m3/s1,s2,s3' with std > 0, "
            f"got {normalization!r}: use e.g. --model.normalization imagenet"
        )
    return mean, std


def _is_vit(model: nn.Module) -> bool:
    return all(
        hasattr(model, a) for a in ("patch_embed", "blocks", "forward_intermediates", "num_prefix_tokens")
    )


class Backbone(nn.Module):
    """timm CNN or ViT: images [B,3,H,W] in [0,1] -> list of feature maps [B,C_i,H/s_i,W/s_i]."""

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        optimize: bool = True,
        *,
        blocks: Sequence[int] | str | None = None,
        trainable: bool = False,
        normalization: str = "backbone",
    ) -> None:
        """Feature extractor.

        Args:
            name: timm model name: a CNN with ``features_only`` support, or a Vision Transformer with ``blocks``.
            strides: output strides of the CNN maps returned, in order (not used with ``blocks``).
            weights: explicit weights file; otherwise resolved as in weights.py (docs/offline.md).
            pretrained: False uses random weights (tests only).
            optimize: drop stages after the deepest requested map and give TensorFlow-ported convolutions
                ("SAME" padding, ``tf_*`` models) their padding without a padded copy of the input
                (``StaticSameConv2d``); frozen CNNs also fold BatchNorm into the preceding convolutions
                (checked numerically, skipped if outputs change); all run channels-last.
                Outputs equal the plain network's up to float rounding.
            blocks: None: a CNN feature pyramid chosen by ``strides`` (a ViT is refused). Otherwise the
                ViT blocks (0-based, negative from the end, returned in ascending order) whose patch tokens
                become maps at stride = patch size; "auto" takes the blocks at 1/2 and 3/4 of the depth.
            trainable: parameters require grad, BatchNorm is not folded and train()/eval() act normally;
                False (default) keeps the network frozen in eval mode.
            normalization: "backbone" (the weights' pretrained mean/std), "imagenet", "none" (identity) or
                "m1,m2,m3/s1,s2,s3".
        """
        super().__init__()
        self.name, self.trainable, self.fused = name, bool(trainable), False
        if not timm.is_model(name):
            raise BackboneError(f"unknown backbone {name!r}: choose a timm model name (timm.list_models()).")
        if blocks is None:
            self.model, self.strides, build = self._build_cnn(name, strides)
            self.blocks: tuple[int, ...] = ()
            self.patch_size: tuple[int, int] | None = None
            layout = None
        else:
            self.model, self.blocks, build = self._build_vit(name, blocks)
            self.patch_size = tuple(self.model.patch_embed.patch_size)
            self.strides = (self.patch_size[0],) * len(self.blocks)
            dim = getattr(self.model, "embed_dim", None) or self.model.num_features
            self.channels = [int(dim)] * len(self.blocks)
            layout = self.model
        self.weights_source, self.weights_sha256 = "random", ""
        if pretrained and is_restoring():
            self.weights_source = PENDING
        elif pretrained:
            self.weights_source, self.weights_sha256 = load_pretrained(
                self.model, name, weights, build, layout
            )
        elif not is_restoring():
            warnings.warn(f"backbone {name} uses RANDOM weights (pretrained=False)", stacklevel=2)
        self.normalization = normalization
        mean, std = normalization_stats(normalization, self.model.pretrained_cfg)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        if not self.trainable:
            self.requires_grad_(False)
            self.model.eval()
        if optimize:
            self.optimize()

    def _build_cnn(self, name: str, strides: Sequence[int]) -> tuple[nn.Module, tuple[int, ...], dict]:
        strides = tuple(int(s) for s in strides)
        probe = structure_model(name, features_only=True)
        reductions = list(probe.feature_info.reduction())
        if len(set(reductions)) < 2:
            raise BackboneError(
                f"backbone {name!r} is not a CNN with a feature pyramid (all its feature maps have stride "
                f"{reductions[0]}); this method needs a CNN, e.g. tf_efficientnet_lite0 or wide_resnet50_2. "
                "(A Vision Transformer's patch tokens are served only to methods that pass blocks=...)"
            )
        bad = [s for s in strides if s not in reductions]
        if bad:
            raise BackboneError(f"backbone {name!r} has feature maps at strides {reductions}, not at {bad}.")
        # the deepest map at each stride
        indices = [max(i for i, r in enumerate(reductions) if r == s) for s in strides]
        build = {"features_only": True, "out_indices": indices}
        model = timm.create_model(name, pretrained=False, **build)
        self.channels = list(model.feature_info.channels())
        return model, strides, build

    def _build_vit(self, name: str, blocks: Sequence[int] | str) -> tuple[nn.Module, tuple[int, ...], dict]:
        build = {"dynamic_img_size": True}
        try:
            model = timm.create_model(name, pretrained=False, **build)
        except TypeError:
            model = None
        if model is None or not _is_vit(model):
            raise BackboneError(
                f"blocks selects Vision Transformer blocks, but {name!r} is not a timm ViT with dynamic "
                "image size: for a CNN choose its maps with strides and leave blocks unset."
            )
        depth = len(model.blocks)
        if isinstance(blocks, str):
            if blocks != "auto":
                raise BackboneError(f"blocks must be 'auto' or a list of block indices, got {blocks!r}")
            blocks = (depth // 2 - 1, (3 * depth) // 4 - 1)
        chosen = [int(b) for b in blocks]
        if not chosen or any(not -depth <= b < depth for b in chosen):
            raise BackboneError(
                f"blocks must name at least one of {name!r}'s {depth} blocks (0..{depth - 1}, or negative "
                f"from the end), got {list(blocks)}: use e.g. --model.blocks [{depth // 2 - 1},{depth - 1}]"
            )
        return model, tuple(sorted({b % depth for b in chosen})), build

    def optimize(self) -> None:
        """Drop unused stages or blocks; a frozen CNN also folds BatchNorm (if exact) and goes channels-last."""
        if self.patch_size is not None:
            self.model.prune_intermediate_layers(list(self.blocks), prune_norm=True, prune_head=True)
            return
        _drop_unused_stages(self.model)
        _static_same_padding(self.model)
        if not self.trainable:
            fused = fold_batchnorm(self.model)
            if fused is not None:
                self.model, self.fused = fused, True
        self.model.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> Backbone:
        """A frozen network stays in eval mode (BatchNorm statistics stay the weights'); a trainable one follows."""
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """[B,3,H,W] in [0,1] -> list of [B,C_i,H/s_i,W/s_i], one per stride (CNN) or block (ViT)."""
        if self.weights_source == PENDING:
            raise RuntimeError(
                f"backbone {self.name} was built inside restoring_weights() and no checkpoint was loaded into "
                "it: load the checkpoint's state dict before running it."
            )
        x = (images - self.mean) / self.std
        if self.patch_size is None:
            return self.model(x.contiguous(memory_format=torch.channels_last))
        height, width = x.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            ph, pw = self.patch_size
            raise InputSizeError(
                f"input size {height}x{width} is not a multiple of {self.name}'s patch size {ph}x{pw}: "
                f"resize images to multiples of it, e.g. {max(1, round(height / ph)) * ph}x"
                f"{max(1, round(width / pw)) * pw} (--data.image_size)."
            )
        return self.model.forward_intermediates(
            x, indices=list(self.blocks), stop_early=True, intermediates_only=True
        )

    def get_extra_state(self) -> dict[str, str]:
        """Weights provenance, saved in the state dict as plain strings (readable with weights_only=True)."""
        return {"weights_source": str(self.weights_source), "weights_sha256": str(self.weights_sha256)}

    def set_extra_state(self, state: Any) -> None:
        """Take the weights provenance of the checkpoint whose tensors are being loaded."""
        if isinstance(state, dict) and isinstance(state.get("weights_source"), str):
            self.weights_source = state["weights_source"]
            self.weights_sha256 = str(state.get("weights_sha256", ""))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # checkpoints written before provenance was saved lack the extra state: accept them
        key = prefix + nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        if key not in state_dict:
            source = UNRECORDED if self.weights_source == PENDING else self.weights_source
            state_dict[key] = {"weights_source": source, "weights_sha256": self.weights_sha256}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


FeatureExtractor = Backbone  # the name ARCHITECTURE.md uses


def _drop_unused_stages(model: nn.Module) -> None:
    """timm's EfficientNet/MobileNet feature models run every stage; keep only those up to the last map."""
    stage_idx = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if stage_idx and isinstance(blocks, nn.Sequential) and getattr(model, "feature_hooks", 1) is None:
        model.blocks = blocks[: max(stage_idx)]  # stage s is the output of blocks[s - 1]


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) zero padding of TensorFlow's "SAME" convolution along one side of ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(nn.Conv2d):
    """A Conv2d with TensorFlow's "SAME" padding that does not copy its input into a padded tensor.

    "SAME" pads one more zero after than before where the total is odd (a stride-2 convolution of an even
    side). timm pads the input for that (a copy of the whole map, then the convolution); here the kernel
    gets the extra zero row / column in front instead and the convolution pads symmetrically by the larger
    amount: every output takes the same products of the same inputs plus products with zeros, so it equals
    timm's to the last bit in float32 (tests/unit/test_extractor.py). A frozen EfficientNet-Lite0 runs about
    1.25x faster for it on one CPU thread (tools/bench_same_padding.py). Same parameters and state dict keys
    as the layer it replaces; shapes are read per call, so any input size works.
    """

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = same_pads(int(x.shape[-2]), kh, sh, dh)
        left, right = same_pads(int(x.shape[-1]), kw, sw, dw)
        weight, extra_h, extra_w = self.weight, bottom - top, right - left
        # a dilated kernel cannot shift by a fraction of its step: pad the input then
        if extra_h % dh or extra_w % dw:
            x = nn.functional.pad(x, (left, right, top, bottom))
            return nn.functional.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if extra_h or extra_w:
            weight = nn.functional.pad(weight, (extra_w // dw, 0, extra_h // dh, 0))
        padding = (bottom, right)
        return nn.functional.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def swap_layer_class(model: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    """Give every layer of exactly type ``old`` the class ``new`` (same parameters, buffers and hooks, in
    place); return how many. ``new`` must read the same attributes as ``old`` (a subclass or its base)."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is old:
            swapped = new.__new__(new)
            swapped.__dict__.update(child.__dict__)
            model._modules[name] = swapped
            count += 1
        else:
            count += swap_layer_class(child, old, new)
    return count


def _static_same_padding(model: nn.Module) -> int:
    """Replace timm's Conv2dSame layers by StaticSameConv2d (in place); return how many."""
    return swap_layer_class(model, Conv2dSame, StaticSameConv2d)


def fold_batchnorm(model: nn.Module, probe_size: int = 64) -> nn.Module | None:
    """Copy of eval-mode ``model`` with BatchNorm folded into the convolutions before it, or None.

    None when nothing could be folded or when folding changes the outputs on a random probe beyond float
    rounding (a BatchNorm registered after a conv it does not follow). The check runs on the real weights
    and on a copy with random BatchNorm statistics, so the decision does not depend on the weights: a
    freshly initialised BatchNorm is the identity and would pass anywhere, and a checkpoint must find the
    same folded layout whether the backbone was built with pretrained or placeholder weights.
    """
    fused = copy.deepcopy(model)
    if not _fold_conv_bn(fused):
        return None
    probe = torch.rand(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    if not _same_outputs(model, fused, probe):
        return None
    shaken = copy.deepcopy(model)
    _randomise_batchnorm(shaken)
    shaken_fused = copy.deepcopy(shaken)
    _fold_conv_bn(shaken_fused)
    return fused if _same_outputs(shaken, shaken_fused, probe) else None


def _same_outputs(a: nn.Module, b: nn.Module, probe: Tensor) -> bool:
    with torch.no_grad():
        ref, out = a(probe), b(probe)
    ref, out = (list(v) if isinstance(v, list | tuple) else [v] for v in (ref, out))
    return all(
        x.shape == y.shape and (x - y).abs().max() <= 1e-4 + 1e-3 * x.abs().max()
        for x, y in zip(ref, out, strict=True)
    )


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _fold_conv_bn(module: nn.Module) -> bool:
    """Fold each BatchNorm2d registered right after a Conv2d into it (in place); True if any was folded.

    Registration order usually is forward order; the caller checks the outputs to be sure.
    """
    folded = False
    names = list(module._modules)
    for conv_name, bn_name in zip(names, names[1:], strict=False):
        conv, bn = module._modules[conv_name], module._modules[bn_name]
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            continue
        if type(bn) is nn.BatchNorm2d:
            after: nn.Module = nn.Identity()
        elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d: keep what follows the norm
            after = nn.Sequential(bn.drop, bn.act)
        else:
            continue  # unknown BatchNorm subclass: leave it
        if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
            continue
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(shift.detach(), requires_grad=False)
        module._modules[bn_name] = after
        folded = True
    for child in module.children():
        folded = _fold_conv_bn(child) or folded
    return folded

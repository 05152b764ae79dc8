"""DSR: quantisation, feature-space anomalies, the two stages, the VQ-VAE file/cache, errors and seeding."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import assert_deterministic_and_traceable, small_datamodule, small_trainer

from adx.models.components.optim import spec
from adx.models.dsr import DSR, DSRModel
from adx.models.dsr.anomalies import ColourSmudge, replace_codes, skip_count
from adx.models.dsr.schedule import StageStepLR
from adx.models.dsr.torch_model import quantization_margins
from adx.models.dsr.vq import (
    Codebook,
    DiscreteLatentModel,
    VQWeightsError,
    load_vq,
    save_vq,
    train_vq,
)

SMALL = {
    "hiddens": 8,
    "residual_hiddens": 4,
    "residual_layers": 1,
    "embedding_dim": 4,
    "codebook_size": 32,
    "restriction_width": 4,
    "decoder_width": 8,
    "detector_width": 4,
    "vq_steps": 20,
    "vq_batch_size": 4,
    "vq_lr": 3e-3,
    "vq_crop_size": 64,
    "smoothing": 5,
}


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DSR cache folder (the natural-image VQ-VAE is cached there)."""
    monkeypatch.setenv("ADX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dsr"


def _ready(**kw) -> DSRModel:
    """A small model whose VQ-VAE is trained on the category's images (a few steps, no cache)."""
    model = DSRModel(**{**SMALL, "vq_source": "category", **kw})
    batches = [{"image": _images(4, 64, seed=s)} for s in range(2)]
    model.prepare_vq(torch.device("cpu"), category_batches=lambda: batches, log=lambda msg: None)
    return model


# ---- quantisation ------------------------------------------------------------------------------
def test_quantisation_returns_codebook_vectors_and_a_straight_through_gradient() -> None:
    book = Codebook(16, 4)
    z = torch.randn(2, 4, 5, 6, requires_grad=True)
    idx = book.indices(z)
    brute = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - book.vectors) ** 2).sum(-1).argmin(-1)
    assert torch.equal(idx, brute), "argmin of |e|^2 - 2 z.e is the nearest vector"
    exact = book.lookup(idx)
    rows = exact.permute(0, 2, 3, 1).reshape(-1, 4)
    assert all(any(torch.equal(r, v) for v in book.vectors) for r in rows), "exact codebook rows"
    q, idx2 = book.quantize(z)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(q, exact, rtol=0, atol=1e-6)
    w = torch.randn_like(q)
    (q * w).sum().backward()
    assert torch.equal(z.grad, w), "straight-through: the gradient passes to z unchanged"


def test_codebook_ema_moves_used_vectors_to_their_means_and_keeps_unused() -> None:
    book = Codebook(4, 2, decay=0.5, eps=0.0)
    before = book.vectors.clone()
    z = torch.tensor([[1.0, 3.0], [2.0, 4.0]]).reshape(1, 2, 1, 2)  # two features: (1, 2) and (3, 4)
    idx = torch.tensor([[[0, 0]]])
    book.ema_update(z, idx)
    # count: 0.5 * 1 + 0.5 * 2 = 1.5; sum: 0.5 * e0 + 0.5 * (4, 6)
    torch.testing.assert_close(book.vectors[0], (0.5 * before[0] + 0.5 * torch.tensor([4.0, 6.0])) / 1.5)
    torch.testing.assert_close(book.vectors[1:], before[1:])


def test_unused_vectors_are_restarted_on_encoder_outputs() -> None:
    book = Codebook(6, 3)
    book.ema_count.copy_(torch.tensor([1.0, 0.01, 1.0, 0.0, 1.0, 1.0]))
    kept = book.vectors[[0, 2, 4, 5]].clone()
    z = torch.randn(1, 3, 4, 4)
    assert book.restart_dead(z, torch.Generator().manual_seed(0)) == 2
    feats = z.permute(0, 2, 3, 1).reshape(-1, 3)
    for i in (1, 3):
        assert (feats == book.vectors[i]).all(1).any() and float(book.ema_count[i]) == 1.0
    assert torch.equal(book.vectors[[0, 2, 4, 5]], kept)


def test_exact_ties_give_the_same_vector_whatever_index_wins() -> None:
    book = Codebook(8, 3)
    book.vectors[5] = book.vectors[2]  # a duplicated row: an exact tie for every feature near it
    z = book.vectors[2].view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    assert torch.equal(book.lookup(book.indices(z)), z)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantiser_agrees_with_onnx_runtime_including_ties(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")

    class Quantise(torch.nn.Module):
        def __init__(self, book: Codebook) -> None:
            super().__init__()
            self.book = book

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.book.lookup(self.book.indices(z))

    book = Codebook(64, 8)
    book.vectors[7] = book.vectors[3]
    module = Quantise(book).eval()
    z = torch.randn(2, 8, 16, 16)
    z[0, :, 0, 0] = book.vectors[3]  # an exact tie between rows 3 and 7
    path = tmp_path / "q.onnx"
    torch.onnx.export(module, (z,), str(path), dynamo=True, opset_version=18)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: z.numpy()})[0]
    assert torch.equal(torch.from_numpy(got), module(z)), "the same indices, hence the same vectors"


# ---- the VQ-VAE --------------------------------------------------------------------------------
def test_vq_training_lowers_the_loss_and_freezes_afterwards() -> None:
    vq = DiscreteLatentModel(8, 4, 1, 4, 16)
    vq.requires_grad_(False)
    images = [_images(4, 64, seed=s) for s in range(2)]
    losses = train_vq(vq, images, 40, 3e-3, log=lambda msg: None)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.7 * losses[0], losses
    assert int(vq.codebook_lo.initialised) == 1
    assert not any(p.requires_grad for p in vq.parameters()), "frozen again after training"


def test_vq_weights_round_trip_and_named_error_on_wrong_shapes(tmp_path: Path) -> None:
    vq = DiscreteLatentModel(8, 4, 1, 4, 16)
    path = tmp_path / "vq.pt"
    save_vq(vq, path, {"kind": "test"})
    other = DiscreteLatentModel(8, 4, 1, 4, 16)
    assert load_vq(other, path) == {"kind": "test"}
    for a, b in zip(vq.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b) or a.dtype == torch.long
    with pytest.raises(VQWeightsError, match=r"codebook_size 16 --model.embedding_dim 4 --model.hiddens 8"):
        load_vq(DiscreteLatentModel(8, 4, 1, 4, 32), path)
    with pytest.raises(VQWeightsError, match="does not exist"):
        load_vq(vq, tmp_path / "missing.pt")
    model = DSRModel(**{**SMALL, "codebook_size": 64, "vq_weights": str(path)})  # built without reading it
    with pytest.raises(VQWeightsError, match="vq.pt do not fit"):
        model.prepare_vq(torch.device("cpu"), log=lambda msg: None)


# adx key -> the authors' key (their DiscreteLatentModel, as in vq_model_pretrained_128_4096.pckl)
TO_AUTHORS = [
    (r"^encoder_hi\.0\.", "_encoder_b._conv_1."),
    (r"^encoder_hi\.2\.", "_encoder_b._conv_2."),
    (r"^encoder_hi\.4\.", "_encoder_b._conv_3."),
    (r"^encoder_hi\.5\.(\d+)\.conv3\.", r"_encoder_b._residual_stack._layers.\1._block.1."),
    (r"^encoder_hi\.5\.(\d+)\.conv1\.", r"_encoder_b._residual_stack._layers.\1._block.3."),
    (r"^encoder_lo\.0\.", "_encoder_t._conv_1."),
    (r"^encoder_lo\.2\.", "_encoder_t._conv_2."),
    (r"^encoder_lo\.4\.(\d+)\.conv3\.", r"_encoder_t._residual_stack._layers.\1._block.1."),
    (r"^encoder_lo\.4\.(\d+)\.conv1\.", r"_encoder_t._residual_stack._layers.\1._block.3."),
    (r"^to_lo\.", "_pre_vq_conv_top."),
    (r"^to_hi\.", "_pre_vq_conv_bot."),
    (r"^codebook_lo\.vectors$", "_vq_vae_top._embedding.weight"),
    (r"^codebook_lo\.ema_count$", "_vq_vae_top._ema_cluster_size"),
    (r"^codebook_lo\.ema_sum$", "_vq_vae_top._ema_w"),
    (r"^codebook_hi\.vectors$", "_vq_vae_bot._embedding.weight"),
    (r"^codebook_hi\.ema_count$", "_vq_vae_bot._ema_cluster_size"),
    (r"^codebook_hi\.ema_sum$", "_vq_vae_bot._ema_w"),
    (r"^upsample_lo\.", "upsample_t."),
    (r"^decoder\.0\.", "_decoder_b._conv_1."),
    (r"^decoder\.1\.(\d+)\.conv3\.", r"_decoder_b._residual_stack._layers.\1._block.1."),
    (r"^decoder\.1\.(\d+)\.conv1\.", r"_decoder_b._residual_stack._layers.\1._block.3."),
    (r"^decoder\.2\.", "_decoder_b._conv_trans_1."),
    (r"^decoder\.4\.", "_decoder_b._conv_trans_2."),
]


def test_authors_vq_layout_is_read(tmp_path: Path) -> None:
    """A state dict with the authors' keys (vq_model_pretrained_128_4096.pckl layout) loads by renaming."""
    vq = DiscreteLatentModel(8, 4, 2, 4, 16)
    theirs = {}
    for key, value in vq.state_dict().items():
        if key.endswith("initialised"):
            continue  # the authors' file has no such flag
        renamed = [re.sub(p, r, key) for p, r in TO_AUTHORS if re.match(p, key)]
        assert len(renamed) == 1, key
        theirs[renamed[0]] = value
    torch.save(theirs, tmp_path / "authors.pckl")
    other = DiscreteLatentModel(8, 4, 2, 4, 16)
    load_vq(other, tmp_path / "authors.pckl")
    x = _images(1, 64)
    torch.testing.assert_close(
        other.decode(**{k: other.quantized(x)[k] for k in ("q_lo", "q_hi")}),
        vq.decode(**{k: vq.quantized(x)[k] for k in ("q_lo", "q_hi")}),
    )


def test_natural_vq_is_trained_once_and_cached(cache: Path) -> None:
    first = DSRModel(**SMALL)
    record = first.prepare_vq(torch.device("cpu"), log=lambda msg: None)
    assert record["kind"] == "natural" and record["reused"] is False
    assert record["images"]["role"] == "natural images" and record["steps"] == SMALL["vq_steps"]
    assert Path(record["cache_file"]).parent == cache and Path(record["cache_file"]).is_file()
    second = DSRModel(**SMALL)
    again = second.prepare_vq(torch.device("cpu"), log=lambda msg: None)
    assert again["reused"] is True and again["key"] == record["key"]
    for a, b in zip(first.vq.state_dict().values(), second.vq.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert second.data_sources()["vq"]["cache_file"] == record["cache_file"]
    other = DSRModel(**{**SMALL, "vq_steps": 21})  # other settings, another cache file
    assert other.prepare_vq(torch.device("cpu"), log=lambda msg: None)["cache_file"] != record["cache_file"]
    json.dumps(second.data_sources())
    assert int(second.prepare_vq(torch.device("cpu"))["reused"]) == 1, "ready: nothing done again"


# ---- feature-space anomalies -------------------------------------------------------------------
def test_replacement_changes_exactly_the_masked_positions() -> None:
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(40, 6, generator=g)
    z = torch.randn(3, 6, 8, 8, generator=g)
    book = Codebook(40, 6)
    book.vectors.copy_(vectors)
    q = book.lookup(book.indices(z))
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    mask[1] = 0  # an image without anomaly
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = replace_codes(z, q, vectors, mask, [0.2, 0.5, 1.0], gens)
    changed = (out != q).any(dim=1, keepdim=True)
    assert torch.equal(changed, mask.bool()), "every masked position changes, no other one"
    rows = out.permute(0, 2, 3, 1).reshape(-1, 6)
    assert all((vectors == r).all(1).any() for r in rows), "replacements are codebook vectors"
    # the replacement is never among the skip nearest and within the strength's k nearest
    skip = skip_count(40)
    dist = ((z.permute(0, 2, 3, 1)[..., None, :] - vectors) ** 2).sum(-1)
    rank = dist.argsort(-1).argsort(-1)  # rank of every vector per position
    chosen = ((out.permute(0, 2, 3, 1)[..., None, :] == vectors).all(-1)).float().argmax(-1)
    r = rank.gather(-1, chosen[..., None])[..., 0]
    m = mask[:, 0].bool()
    assert int(r[m].min()) >= skip
    assert int(r[0][m[0]].max()) < int(0.2 * 40) + 1
    again = replace_codes(
        z, q, vectors, mask, [0.2, 0.5, 1.0], [torch.Generator().manual_seed(i) for i in range(3)]
    )
    assert torch.equal(out, again), "seeded"


def test_feature_anomalies_and_their_masks_match() -> None:
    model = _ready(p_anomaly=1.0)
    images = _images(12, 64)
    s = model.synthesize_features(images, list(range(12)))
    assert set(s["mode"].tolist()) == {0, 1, 2}, "all three modes drawn in 12 images"
    for i, mode in enumerate(s["mode"].tolist()):
        lo_changed = (s["a_lo"][i] != s["q_lo"][i]).any(0)
        hi_changed = (s["a_hi"][i] != s["q_hi"][i]).any(0)
        m_lo, m_hi = s["mask_lo"][i, 0].bool(), s["mask_hi"][i, 0].bool()
        assert m_lo.any() and m_hi.any()
        if mode == 2:  # Q_hi only
            assert torch.equal(hi_changed, m_hi) and not lo_changed.any()
            expected = m_hi.repeat_interleave(4, 0).repeat_interleave(4, 1)
        else:  # Q_lo altered at exactly its mask
            assert torch.equal(lo_changed, m_lo)
            if mode == 1:
                assert not hi_changed.any()
            expected = m_lo.repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.equal(s["target"][i, 0].bool(), expected), "the target is the altered map's mask"
    torch.testing.assert_close(s["general"], model.vq.decode(s["a_lo"], s["a_hi"]))
    clean = _ready(p_anomaly=0.0).synthesize_features(images[:3], [0, 1, 2])
    assert torch.equal(clean["a_lo"], clean["q_lo"]) and torch.equal(clean["a_hi"], clean["q_hi"])
    assert not clean["target"].any()


def test_seeded_anomalies_reproduce() -> None:
    model = _ready(p_anomaly=1.0)
    images = _images(4, 64)
    batch = {"image": images, "anomaly_step": 3, "anomaly_rank": 0}
    seeds = model.anomaly_seeds(batch, "features")
    a, b = model.synthesize_features(images, seeds), model.synthesize_features(images, seeds)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.anomaly_seeds({**batch, "anomaly_step": 4}, "features") != seeds
    assert model.anomaly_seeds(batch, "images") != seeds
    x1, m1 = model.synthesize_images(images, model.anomaly_seeds(batch, "images"))
    x2, m2 = model.synthesize_images(images, model.anomaly_seeds(batch, "images"))
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    paths = ["a.png", "b.png", "c.png", "d.png"]
    fwd = model.anomaly_seeds({"image": images, "path": paths}, "features")
    assert fwd == model.anomaly_seeds({"image": images, "path": paths[::-1]}, "features")[::-1]


def test_colour_smudges_touch_only_the_mask() -> None:
    smudge = ColourSmudge(p_anomaly=1.0)
    image = _images(1, 64)[0]
    out, mask = smudge(image, torch.Generator().manual_seed(1))
    assert mask.any() and torch.equal(out[(mask == 0).expand_as(image)], image[(mask == 0).expand_as(image)])
    assert smudge.provenance()["method"] == "perlin-colour"


# ---- stages ------------------------------------------------------------------------------------
def _fake_trainer(max_epochs: int = 3, image_size: tuple[int, int] = (64, 64)) -> SimpleNamespace:
    dm = SimpleNamespace(image_size=image_size, tiling=None, train_on_tiles=False)
    return SimpleNamespace(datamodule=dm, max_epochs=max_epochs, lr_scheduler_configs=[])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_stage_trains_only_its_parameters() -> None:
    lit = DSR(**SMALL, vq_source="category", p_anomaly=1.0)
    lit.model = _ready(p_anomaly=1.0)
    lit.trainer = _fake_trainer(3)
    out = lit.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(sched, StageStepLR) and sched.stage1_epochs == 2
    batch = {"image": _images(4, 64), "anomaly_step": 0}
    parts = ("vq", "restrict_lo", "restrict_hi", "object_decoder", "detector", "upsampler")
    for stage, trained in (
        (1, {"restrict_lo", "restrict_hi", "object_decoder", "detector"}),
        (2, {"upsampler"}),
    ):
        lit.model.stage = stage
        before = {p: _snapshot(getattr(lit.model, p)) for p in parts}
        opt.zero_grad(set_to_none=True)
        lit.model.loss(batch).backward()
        opt.step()
        for p in parts:
            after = getattr(lit.model, p).state_dict()
            moved = any(not torch.equal(before[p][k], after[k]) for k in after)
            assert moved == (p in trained), (
                f"stage {stage}: {p} {'did not train' if p in trained else 'moved'}"
            )


def test_stage_boundaries_and_schedule() -> None:
    model = DSRModel(**SMALL)
    assert [model.stage1_epochs(e) for e in (2, 3, 10, 150)] == [1, 2, 7, 100]
    assert [model.stage_of(e, 3) for e in range(3)] == [1, 1, 2]
    with pytest.raises(ValueError, match="max_epochs"):
        model.stage1_epochs(1)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=2e-4)
    sched = StageStepLR(opt, milestone=0.8, gamma=0.1)
    sched.set_horizon(100)  # the paper: 100 main epochs, drop at 80, then 50 upsampling epochs
    assert sched.drop_epoch() == 80
    lrs = []
    for _ in range(150):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[79] == pytest.approx([2e-4, 2e-4]) and lrs[80] == pytest.approx([2e-5, 2e-4])
    assert lrs[149] == pytest.approx([2e-5, 2e-4]), "the upsampling group is never dropped"
    with pytest.raises(ValueError, match="milestone"):
        StageStepLR(opt, milestone=1.5)


def test_losses_decrease_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = _ready(p_anomaly=1.0)
    batch = {"image": _images(4, 64), "anomaly_step": 0}  # the same anomalies every step
    for stage, params in ((1, model.stage1_parameters()), (2, model.stage2_parameters())):
        model.stage = stage
        opt = torch.optim.Adam(params, lr=3e-3)
        losses = []
        for _ in range(15):
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses)
        assert min(losses[-3:]) < 0.8 * losses[0], (stage, losses)


# ---- inference ---------------------------------------------------------------------------------
def test_forward_shapes_ranges_and_trace() -> None:
    model = _ready().eval()
    for size in (64, 96):
        x = _images(2, size)
        with torch.no_grad():
            scores, maps = model(x)
        assert scores.shape == (2,) and maps.shape == (2, size, size)
        assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0
        assert 0.0 <= float(scores.min()) and float(scores.max()) <= 1.0
    x = _images(2, 64)
    assert_deterministic_and_traceable(model, x)


def test_quantization_margins_cover_the_four_searches() -> None:
    model = _ready().eval()
    margins = quantization_margins(model, _images(2, 64))
    assert set(margins) == {"q_lo", "q_hi", "restored_lo", "restored_hi"}
    assert margins["q_lo"].numel() == 2 * 8 * 8 and margins["q_hi"].numel() == 2 * 16 * 16
    assert all(float(v.min()) >= 0 for v in margins.values())


def _report(flips: list[list[float]], map_diff: float) -> dict:
    searches = [{"flipped": len(g), "relative_gaps_at_flips": g} for g in flips]
    return {"size": [80, 96], "map_max_diff": map_diff, "searches": searches}


def test_unexplained_accepts_near_tie_flips_and_what_follows_them_only() -> None:
    from adx.models.dsr.code_flips import unexplained

    near, wide = [1e-7], [3e-4]
    assert (
        unexplained([_report([[], near, [], wide * 5], 0.03)]) == []
    )  # the traced case: a near-tie, then its wake
    assert unexplained([_report([[], [], [], []], 2e-6)]) == []  # rounding only
    assert "not near-ties" in unexplained([_report([[], wide, [], []], 0.03)])[0]
    assert "no code flipped" in unexplained([_report([[], [], [], []], 0.03)])[0]


def test_same_seed_same_weights() -> None:
    a, b, c = DSRModel(**SMALL, seed=1), DSRModel(**SMALL, seed=1), DSRModel(**SMALL, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_unfitted_model_says_so() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        DSRModel(**SMALL).check_fitted()


# ---- named errors before work ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hiddens": 7}, "hiddens"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"detector_width": 2.5}, "detector_width"),
        ({"vq_source": "imagenet"}, "vq_source"),
        ({"vq_steps": 0}, "vq_steps"),
        ({"vq_lr": 0.0}, "vq_lr"),
        ({"vq_crop_size": 100}, "vq_crop_size"),
        ({"vq_decay": 1.0}, "vq_decay"),
        ({"anomaly_strength": 1.5}, "anomaly_strength"),
        ({"p_anomaly": -0.1}, "p_anomaly"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"upsampling_fraction": 1.0}, "upsampling_fraction"),
        ({"upsampling_anomalies": "dtd"}, "upsampling_anomalies"),
        ({"opacity": (0.9, 0.1)}, "opacity"),
        ({"smoothing": 4}, "smoothing"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DSR(**kwargs)


def test_fit_start_checks_size_and_epochs_before_work(cache: Path) -> None:
    model = DSR(**SMALL)
    model.trainer = _fake_trainer(3, (72, 72))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.on_fit_start()
    model.trainer = _fake_trainer(1, (64, 64))
    with pytest.raises(ValueError, match="max_epochs"):
        model.on_fit_start()
    assert not cache.exists(), "no VQ-VAE was trained"


# ---- a whole fit -------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_records_sources_in_metrics_and_checkpoint(
    synthetic_root: Path, tmp_path: Path, cache: Path
) -> None:
    model = DSR(**SMALL, optimizer=spec("torch.optim.Adam", lr=3e-3))
    dm = small_datamodule(synthetic_root)
    trainer = small_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=dm)
    assert int(model.model.trained_steps) == 9 and model.model.stage == 2
    trainer.test(model, datamodule=dm, verbose=False)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["sources"]["vq"]["kind"] == "natural"
    assert report["sources"]["anomalies"]["method"] == "perlin-colour"
    assert {"train/features", "train/image", "train/focal", "train/upsampling_focal"} <= set(report["fit"])
    path = tmp_path / "dsr.ckpt"
    trainer.save_checkpoint(path)
    restored = DSR.load_from_checkpoint(path)
    assert int(restored.model.vq_ready) == 1
    assert restored.model.data_sources() == report["sources"]
    x = _images(2, 64)
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), restored.model(x))

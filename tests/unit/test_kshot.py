"""Few-shot training data: ``--data.k_shot`` picks, summary, manifest and the validation guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from adx.data import AdxDataError, AnomalyDataModule, Synthetic, make_synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(
        tmp_path_factory.mktemp("kshot") / "demo", n_train=20, n_test_good=6, n_test_bad=6, size=32
    )


def _dm(root: Path, **kwargs: object) -> Synthetic:
    kwargs.setdefault("val_source", "none")
    return Synthetic(
        root=str(root),
        n_train=20,
        n_test_good=6,
        n_test_bad=6,
        size=32,
        image_size=16,
        num_workers=0,
        **kwargs,
    )


def _picks(root: Path, **kwargs: object) -> list[str]:
    dm = _dm(root, **kwargs)
    dm.setup("fit")
    return dm.k_shot_paths


def test_k_shot_training_set(root: Path) -> None:
    dm = _dm(root, k_shot=4, batch_size=16)
    dm.setup("fit")
    all_train = sorted(str(p) for p in (root / "train/good").iterdir())
    assert len(dm.train_samples) == 4 and all(s.label == 0 and s.split == "train" for s in dm.train_samples)
    assert {s.image_path for s in dm.train_samples} <= set(all_train)
    assert dm.k_shot_paths == [os.path.abspath(s.image_path) for s in dm.train_samples]
    assert all(os.path.isabs(p) for p in dm.k_shot_paths)
    batches = list(dm.train_dataloader())
    assert sum(len(b["path"]) for b in batches) == 4
    assert len(dm.test_samples) == 12  # the test set is untouched


def test_k_shot_is_seeded_and_nested(root: Path) -> None:
    picks = _picks(root, k_shot=3, seed=0)
    assert picks == _picks(root, k_shot=3, seed=0)  # reproducible
    others = [_picks(root, k_shot=3, seed=s) for s in (1, 2, 3)]
    assert all(p != picks for p in others) and len({tuple(p) for p in others}) == 3  # seeds give other picks
    assert set(picks) <= set(_picks(root, k_shot=6, seed=0))  # smaller K are subsets of larger K
    assert len(_picks(root, k_shot=20)) == 20  # every training image is allowed


def test_k_shot_summary_lists_the_images(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dm = _dm(root, k_shot=2, seed=5)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert "k_shot 2" in out and "of 20" in out and "seed 5" in out and "train 2 " in out
    assert all(p in out for p in dm.k_shot_paths)
    plain = _dm(root)
    plain.setup("fit")
    assert "k_shot" not in plain.summary() and plain.k_shot_paths == []


def test_k_shot_with_test_split_validation(root: Path) -> None:
    dm = _dm(root, k_shot=3, val_source="test_split", val_ratio=0.34)
    dm.setup("fit")
    assert len(dm.train_samples) == 3 and dm.val_has_anomalies
    assert all(s.split == "test" for s in dm.val_samples)  # no training image beyond the K shots is used
    full = _dm(root, val_source="test_split", val_ratio=0.34)
    full.setup("fit")
    assert (
        full.val_samples == dm.val_samples and full.test_samples == dm.test_samples
    )  # same split as without


def test_k_shot_refuses_train_split_validation(root: Path) -> None:
    with pytest.raises(AdxDataError, match="--data.val_source") as err:
        _dm(root, k_shot=3, val_source="train_split")
    assert "test_split" in str(err.value) and "none" in str(err.value) and "--data.k_shot" in str(err.value)


@pytest.mark.parametrize("bad", [-1, -2, True, 2.5, "3"])
def test_bad_k_shot_is_named(root: Path, bad: object) -> None:
    with pytest.raises(AdxDataError, match="--data.k_shot"):
        _dm(root, k_shot=bad)


def test_zero_shot_has_no_training_images(root: Path) -> None:
    dm = _dm(root, k_shot=0, val_source="test_split", val_ratio=0.34)
    dm.setup("fit")
    assert dm.train_samples == [] and dm.k_shot_paths == [] and dm.val_samples
    assert len(dm.train_dataloader()) == 0


def test_k_shot_above_training_images(root: Path) -> None:
    dm = _dm(root, k_shot=21)
    with pytest.raises(AdxDataError, match=r"k_shot=21.*20 training.*--data\.k_shot to at most 20"):
        dm.setup("fit")


def test_write_manifest_never_overwrites(root: Path, tmp_path: Path) -> None:
    dm = _dm(root, k_shot=3, seed=7)
    with pytest.raises(RuntimeError, match="setup"):
        dm.write_manifest(tmp_path)
    dm.setup("fit")
    run = tmp_path / "results" / "v0"  # created if missing
    first = dm.write_manifest(run)
    assert first == run / "k_shot.txt"
    assert first.read_text().splitlines() == dm.k_shot_paths
    first.write_text("edited by hand\n")
    second = dm.write_manifest(run)
    third = dm.write_manifest(run)
    assert (second.name, third.name) == ("k_shot_1.txt", "k_shot_2.txt")
    assert first.read_text() == "edited by hand\n" and second.read_text() == third.read_text()
    plain = _dm(root)
    plain.setup("fit")
    with pytest.raises(AdxDataError, match="k_shot"):
        plain.write_manifest(run)


def test_k_shot_and_bit_depth_from_the_command_line(tmp_path: Path) -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalyDataModule, "data")
    base = ["--data=adx.data.Synthetic", f"--data.root={tmp_path / 'syn'}"]
    cfg = parser.parse_args(base)
    assert cfg.data.init_args.k_shot is None and cfg.data.init_args.bit_depth == "auto"
    assert cfg.data.init_args.fast_jpeg is False
    cfg = parser.parse_args([*base, "--data.k_shot=4", "--data.val_source=test_split", "--data.bit_depth=12"])
    dm = parser.instantiate(cfg).data
    assert dm.k_shot == 4 and dm.bit_depth == 12 and dm.val_source == "test_split"

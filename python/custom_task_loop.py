"""The DualLoRA task loop written out with the library's pieces, for your own data and model.

    python python/custom_task_loop.py            # 3 synthetic tasks on a tiny random ViT, CPU, seconds

`duallora train` does the same with checkpoints, metrics and plots; copy this file when you need
your own data pipeline or training step. Each step is the one of docs/method.md.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from duallora_kernels.continual.calibration import calibrate_logits, first_pass_gate
from duallora_kernels.nn import begin_task, collect_inputs, end_task, residual_off, set_gate
from duallora_kernels.vit import ContinualViT, create_vit

TEMPERATURE = 0.05


def synthetic_task(t: int, n: int = 64, classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Gratings: the task sets the orientation, the class the frequency."""
    y = torch.arange(n) % classes
    angle = torch.tensor(t * 3.1416 / 3)
    coords = torch.arange(28.0)
    along = torch.cos(angle) * coords[None, :] + torch.sin(angle) * coords[:, None]  # (28, 28)
    freq = (0.3 + 0.4 * y.float())[:, None, None]
    phase = 6.2832 * torch.rand(n, 1, 1)
    x = torch.sin(freq * along + phase) + 0.2 * torch.randn(n, 28, 28)
    return x[:, None], y + t * classes  # global labels


def predict(model: ContinualViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global gate from a first pass with the residual blocks off, then calibrated logits."""
    gate = first_pass_gate(model, x, model.num_tasks, TEMPERATURE)
    set_gate(model, gate)
    logits = calibrate_logits(model(x), gate, model.task_label_ranges, beta=1.0)
    set_gate(model, None)
    return logits, gate


def main() -> None:
    parser = argparse.ArgumentParser(
        description="The DualLoRA task loop with the library's pieces: 3 synthetic tasks on a tiny random ViT, "
        "on the CPU, in seconds. Prints each task's accuracy after every task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the synthetic data")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    backbone = create_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=2, embed_dim=48, num_heads=3)
    model = ContinualViT(backbone, adapter=dict(rank_orth=4, rank_res=2, temperature=TEMPERATURE))
    data = [synthetic_task(t) for t in range(3)]
    for t, (x, y) in enumerate(data):
        model.add_task_head(2)
        model.eval()
        with torch.no_grad(), collect_inputs(model) as stats:      # 1. the task's inputs ...
            model.features(x)
        begin_task(model, stats)                                    # ... start its adapters
        params = [p for p in model.parameters() if p.requires_grad]  # adapters + the new head
        opt = torch.optim.AdamW(params, lr=3e-3)
        model.train()
        for _ in range(30):                                         # 2. train on task t only
            loss = F.cross_entropy(model.logits_per_task(x)[t], y - 2 * t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad(), collect_inputs(model) as stats:      # 3. the trained model's inputs
            model.features(x)
        with torch.no_grad(), residual_off(model), collect_inputs(model) as task_stats:
            model.features(x)                                       # ... as the first pass sees them
        added = end_task(model, stats, task_stats)                  # fold, freeze, extend M, keep U_t
        with torch.no_grad():                                       # 4. evaluate all tasks so far
            accs = []
            for j in range(t + 1):
                logits, gate = predict(model, data[j][0])
                accs.append((logits.argmax(1) == data[j][1]).float().mean().item())
        print(f"after task {t}: accuracy per task {[f'{a:.2f}' for a in accs]}, "
              f"basis grew by {sum(added.values())} directions over {len(added)} layers")


if __name__ == "__main__":
    main()

"""Put DualLoRA into a timm ViT and take one training step on its adapters.

    python python/inject_timm_vit.py                  # vit_small_patch16_224, random weights, CPU
    python python/inject_timm_vit.py --model vit_base_patch16_224 --batch 64 --dtype bfloat16   # on a GPU
    python python/inject_timm_vit.py --model beit_base_patch16_224   # DeiT, BEiT, EVA-02, Swin ...: qkv/proj/fc1/fc2

Any timm model whose linear layers are named qkv, proj, fc1, fc2 works (README, "timm families": which
names other families use); BEiT's and EVA's fused-qkv attention is switched by inject to call the layer.

On a CUDA device the layers run the fused Triton kernels (backend="auto"); on the CPU the
PyTorch reference. Prints which layers were adapted, the trainable parameter count, and the
bytes autograd keeps for backward.
"""
from __future__ import annotations

import argparse

import timm
import torch

from duallora_kernels.nn import begin_task, collect_inputs, dual_lora_layers, inject


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="a timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=224, help="input images' side")
    p.add_argument("--depth", type=int, default=None, help="fewer blocks for a quick try (default: %(default)s, the model's own)")
    p.add_argument("--batch", type=int, default=4, help="images in the training step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype")
    p.add_argument("--rank-orth", type=int, default=8, help="rank of the orthogonal adapter")
    p.add_argument("--rank-res", type=int, default=4, help="rank of each task's residual block")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    extra = {} if args.depth is None else {"depth": args.depth}
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=10, **extra).to(device, dtype)
    model.requires_grad_(False)
    names = inject(model, targets=("qkv", "proj", "fc1", "fc2"), rank_orth=args.rank_orth, rank_res=args.rank_res)
    model.head.requires_grad_(True)
    print(f"adapted {len(names)} linear layers, e.g. {names[:4]}")

    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    model.eval()
    with torch.no_grad(), collect_inputs(model) as stats:  # the task's inputs start the adapters
        model(images)
    begin_task(model, stats)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    model.train()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    opt.step()
    layer = next(iter(dual_lora_layers(model).values()))
    print(f"loss {loss.item():.4f}; backend {layer.backend!r} on {device}; "
          f"saved for backward: {sum(saved.values()) / 2**20:.1f} MiB")
    print(layer)


if __name__ == "__main__":
    main()

"""``duallora bench --tasks 1,5,10,20``: how the cost of DualLoRA grows with the number of finished tasks.

Each finished task leaves every adapted layer more memory basis columns (M grows by ``basis_per_task * d``
columns a task, an assumption: GPM adds what each task's inputs need), its task bases U_t, and (from the
second task on) a frozen residual block of rank_res. For each number of finished tasks T the layers are put in
the state of training task T + 1 (:func:`~.vit_models.load_training_state`: T - 1 frozen blocks, the training
orthogonal adapter and residual block) and measured beside the frozen model, in one run:

* ``scope="layer"``: one ViT layer (default vit_b.fc1), a DualLoRALinear against the frozen ``nn.Linear``:
  the training step (forward+backward; the frozen blocks take no part while a task trains) and the
  inference forward gated over every residual block (the dynamic memory's path, where the frozen blocks
  do take part): device operations, time and the ratio of the times, and the parameter and buffer bytes;
* ``scope="vit"``: a whole ViT-B/16 training step (:func:`~.memory_trace.planned_step`: forward, backward,
  AdamW) against the frozen ViT: device operations, time and ratio, parameter and buffer bytes, and the
  memory planner's peak of the same step at the plan's batch on a GPU (:mod:`.memory_plan`) with its
  largest batch.

Times are wall-clock on the CPU (torch backend) or ``do_bench`` on a GPU (Triton), each fused measurement
beside a frozen one taken just before it, so that their ratio shares the machine's state. Device operations are
counted by :func:`~.device_ops.count_step`; the layer is also counted with the Triton kernels where they run
(a GPU, or the CPU under TRITON_INTERPRET=1, on 16 rows: the count does not depend on m).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .device_ops import count_step
from .devices import triton_interpreting
from .gpus import GpuSpec
from .memory_plan import geometry, plan_variant
from .memory_trace import make_optimizer, planned_step
from .problems import LayerShape, TOKENS, TORCH_DTYPES, seeded_generator, split_rank
from .timing import time_callable
from .vit_models import build_vit_variant, load_training_state

__all__ = ["TASKS_SCHEMA", "DEFAULT_BASIS_PER_TASK", "parse_tasks", "param_bytes", "layer_rows", "vit_rows",
           "run_task_growth"]

TASKS_SCHEMA = "duallora-tasks/1"
#: Memory basis columns each finished task adds, as a fraction of the layer's input width d.
DEFAULT_BASIS_PER_TASK = 1 / 32


def parse_tasks(spec: str) -> list[int]:
    """``--tasks 1,5,10,20``: distinct numbers of finished tasks, each >= 1, in increasing order."""
    words = [w for w in spec.replace(" ", ",").split(",") if w]
    try:
        tasks = sorted({int(w) for w in words})
    except ValueError:
        raise ValueError(f"--tasks takes numbers of finished tasks like 1,5,10,20, got {spec!r}") from None
    if not tasks or tasks[0] < 1:
        raise ValueError(f"--tasks takes numbers of finished tasks >= 1 (a layer with a memory basis), got {spec!r}")
    return tasks


def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (DualLoRA's bases and frozen blocks are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def _dual_layer(shape: LayerShape, rank: int, tasks: int, s: dict[str, Any], device: torch.device,
                backend: str) -> tuple[nn.Module, nn.Linear]:
    """A DualLoRALinear in task ``tasks`` + 1 of training and the frozen ``nn.Linear`` it adapts."""
    from ..nn import DualLoRALinear

    dt = TORCH_DTYPES[s["dtype"]]
    torch.manual_seed(s["seed"])
    linear = nn.Linear(shape.d, shape.n, device=device, dtype=dt).requires_grad_(False)
    r_o, r_r = split_rank(rank)
    layer = DualLoRALinear.from_linear(linear, rank_orth=r_o, rank_res=max(1, r_r), use_res=r_r > 0, backend=backend)
    load_training_state(layer, rank, seed=s["seed"], tasks=tasks, basis_per_task=s["basis_per_task"])
    return layer, linear


def _layer_steps(layer: nn.Module, rows: int, device: torch.device, seed: int) -> dict[str, Callable[[], None]]:
    """The training step (forward+backward) and the gated inference forward of ``layer`` on ``rows`` rows."""
    g = seeded_generator(device, seed)
    w = next(iter(layer.parameters()))
    x = torch.randn(rows, layer.in_features, generator=g, device=device, dtype=torch.float32).to(w.dtype)
    x.requires_grad_(True)
    dy = torch.randn(rows, layer.out_features, generator=g, device=device, dtype=torch.float32).to(w.dtype)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    known = getattr(layer, "tasks_done", 0) + 1  # finished tasks and the one in progress

    def train() -> None:
        x.grad = None
        for p in trainable:
            p.grad = None
        layer(x).backward(dy)

    def infer() -> None:
        with torch.no_grad():
            if hasattr(layer, "set_gate"):
                layer.set_gate(torch.full((known,), 1.0 / known, device=device))  # every residual block on
            layer(x)
            if hasattr(layer, "set_gate"):
                layer.set_gate(None)

    return {"train": train, "infer": infer}


def _timed_pair(frozen: Callable[[], None], fused: Callable[[], None], device: torch.device,
                s: dict[str, Any]) -> tuple[float, float]:
    """Median ms of the frozen step, then of the fused one right after it."""
    kw = dict(warmup_ms=s["warmup_ms"], rep_ms=s["rep_ms"])
    return time_callable(frozen, device, **kw).median_ms, time_callable(fused, device, **kw).median_ms


def layer_rows(s: dict[str, Any], device: torch.device, tick: Callable[[str], None] = lambda msg: None
               ) -> list[dict[str, Any]]:
    """One ``scope="layer"`` row per number of finished tasks (module doc)."""
    shape, rank = s["shapes"][0], s["rank"]
    backend, m = _backend(device), s["batch"] * TOKENS
    rows = []
    for tasks in s["tasks"]:
        tick(f"layer {shape.name}, {tasks} task(s) done")
        layer, linear = _dual_layer(shape, rank, tasks, s, device, backend)
        fused, frozen = _layer_steps(layer, m, device, s["seed"]), _layer_steps(linear, m, device, s["seed"])
        row: dict[str, Any] = {
            "kind": "task_growth", "scope": "layer", "tasks": tasks, "model": shape.name, "d": shape.d, "n": shape.n,
            "m": m, "rank": rank, "rank_res": layer.rank_res, "dtype": s["dtype"], "backend": backend,
            "basis_columns": layer.basis_size, "frozen_blocks": len(layer._frozen_task_ids),
            "param_bytes": param_bytes(layer), "frozen_param_bytes": param_bytes(linear),
        }
        for pass_ in ("train", "infer"):
            frozen_ms, fused_ms = _timed_pair(frozen[pass_], fused[pass_], device, s)
            row.update({f"{pass_}_ops": count_step(fused[pass_], device).total,
                        f"{pass_}_frozen_ops": count_step(frozen[pass_], device).total,
                        f"{pass_}_ms": fused_ms, f"{pass_}_frozen_ms": frozen_ms,
                        f"{pass_}_over_frozen": fused_ms / frozen_ms})
        row["triton_train_ops"], row["triton_infer_ops"] = _triton_counts(shape, rank, tasks, s, device)
        rows.append(row)
        del layer, linear
    return rows


def _triton_counts(shape: LayerShape, rank: int, tasks: int, s: dict[str, Any], device: torch.device
                   ) -> tuple[int | None, int | None]:
    """The layer's device operations with the Triton kernels (on 16 rows: the count does not depend on m), where
    they run; else (None, None)."""
    if device.type != "cuda" and not triton_interpreting():
        return None, None
    layer, _ = _dual_layer(shape, rank, tasks, s, device, "triton")
    steps = _layer_steps(layer, 16, device, s["seed"])
    return count_step(steps["train"], device).total, count_step(steps["infer"], device).total


def vit_rows(s: dict[str, Any], device: torch.device, tick: Callable[[str], None] = lambda msg: None
             ) -> list[dict[str, Any]]:
    """One ``scope="vit"`` row per number of finished tasks (module doc)."""
    from ..nn import dual_lora_layers

    backend = _backend(device)
    build = dict(rank=s["rank"], device=device, dtype=s["dtype"], seed=s["seed"], num_classes=s["num_classes"],
                 **s["timm_kwargs"])
    frozen = build_vit_variant("frozen", s["model"], **build)
    frozen_opt = make_optimizer(frozen)
    frozen_step = lambda: planned_step(frozen, frozen_opt, s["vit_batch"], s["num_classes"], None)  # noqa: E731
    plan = _plan_settings(s)
    geo = geometry(plan)
    gpu: GpuSpec = plan["gpus"][0]
    tick("planning the frozen model")
    frozen_plan = plan_variant("frozen", plan, geo).gpu_row(gpu)
    rows = []
    for tasks in s["tasks"]:
        tick(f"{s['model']}, {tasks} task(s) done")
        model = build_vit_variant("fused", s["model"], tasks=tasks, basis_per_task=s["basis_per_task"], **build)
        layers = dual_lora_layers(model).values()
        for layer in layers:
            layer.backend = backend
        opt = make_optimizer(model)
        step = lambda: planned_step(model, opt, s["vit_batch"], s["num_classes"], None)  # noqa: E731
        frozen_ms, fused_ms = _timed_pair(frozen_step, step, device, s)
        tick(f"planning {s['model']} at {tasks} task(s) done")
        planned = plan_variant("fused", {**plan, "tasks": tasks}, geo).gpu_row(gpu)
        rows.append({
            "kind": "task_growth", "scope": "vit", "tasks": tasks, "model": s["model_label"], "rank": s["rank"],
            "rank_res": next(iter(layers)).rank_res, "batch": s["vit_batch"], "dtype": s["dtype"], "backend": backend,
            "layers": len(layers), "basis_columns": sum(layer.basis_size for layer in layers),
            "frozen_blocks": sum(len(layer._frozen_task_ids) for layer in layers),
            "param_bytes": param_bytes(model), "frozen_param_bytes": param_bytes(frozen),
            "train_ops": count_step(step, device).total, "train_frozen_ops": count_step(frozen_step, device).total,
            "train_ms": fused_ms, "train_frozen_ms": frozen_ms, "train_over_frozen": fused_ms / frozen_ms,
            "plan_gpu": gpu.key, "plan_batch": plan["batch"], "planned_bytes": planned["device_bytes"],
            "planned_frozen_bytes": frozen_plan["device_bytes"], "planned_max_batch": planned["max_batch"],
            "planned_frozen_max_batch": frozen_plan["max_batch"],
        })
        del model, opt
    return rows


def _plan_settings(s: dict[str, Any]) -> dict[str, Any]:
    """The memory planner's settings for the ViT rows: the planner's defaults (float32 parameters, bf16
    autocast, AdamW, batch ``plan_batch``) on the model and basis growth of this run."""
    from ..commands.plan_memory import DEFAULT_GPUS
    from .gpus import parse_gpus

    return {"model": s["model"], "model_label": s["model_label"], "timm_kwargs": s["timm_kwargs"],
            "num_classes": s["num_classes"], "rank": s["rank"], "targets": ["qkv", "proj", "fc1", "fc2"],
            "dtype": "float32", "amp": torch.bfloat16, "optimizer": "adamw", "batch": s["plan_batch"],
            "max_batch_cap": 2048, "gpus": parse_gpus([s.get("plan_gpu") or DEFAULT_GPUS.split(",")[0]]),
            "basis_per_task": s["basis_per_task"]}


def run_task_growth(s: dict[str, Any], device: torch.device, *, progress: bool = True,
                    on_group: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """The layer rows, then the ViT rows, of the settings ``s`` (:func:`~duallora_kernels.commands.bench.task_settings`).
    ``on_group(rows)`` after each scope (partial results survive a time limit)."""
    from tqdm.auto import tqdm

    with tqdm(total=3 * len(s["tasks"]) + 1, desc="bench --tasks", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        def tick(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        rows = layer_rows(s, device, tick)
        if on_group is not None:
            on_group(rows)
        rows += vit_rows(s, device, tick)
    return rows

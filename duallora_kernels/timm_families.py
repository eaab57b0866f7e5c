"""``inject`` on the timm families people adapt: tiny random-weight models of 14 families, the targets each
uses, what gets adapted, and how far a finished task's outputs move while the next task trains.

Written to ``results/timm-families/families.json`` (rendered into the README's ``timm-families`` section by
``python -m duallora_kernels.readme``); ``tests/test_timm_families.py`` runs the same lifecycle on every
family, checks the guarantee layer by layer, and holds the file to what it measures.

    python -m duallora_kernels.timm_families    # rewrite families.json (then python -m duallora_kernels.readme)

The lifecycle (:func:`run_two_tasks`): one image per task (so a layer's task-1 tokens span fewer directions
than its width, and M leaves the next task room), the adapters' training a few AdamW steps towards a random
target of the pooled features, the model in eval mode throughout (frozen norms and dropout). *Movement* is
``||f_after - f_before|| / ||f_before||`` of task 1's pooled features, before and after task 2 trained, both
under task 1's gate. The guarantee it measures (docs/method.md, "Orthogonal adapter"): a later task's
orthogonal update ``dW`` satisfies ``dW M = 0``, so a layer's output on its task-1 inputs X moves by
``||dW (I - M M^T) X|| <= ||dW||_2 ||(I - M M^T) X||``, and M keeps at least the threshold's share of X's
energy: ``||(I - M M^T) X||^2 <= (1 - threshold) ||X||^2``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .inject import linear_layers
from .nn import begin_task, collect_inputs, dual_lora_layers, end_task, inject, set_gate

__all__ = ["Case", "CASES", "LAYER_KWARGS", "build", "images", "run_two_tasks", "describe", "survey", "render",
           "max_movement", "JSON_PATH"]

JSON_PATH = Path(__file__).resolve().parents[1] / "results" / "timm-families" / "families.json"
#: The adapters of every case: ranks that fit the narrowest targeted layer of the tiny configurations.
LAYER_KWARGS = dict(rank_orth=4, rank_res=2, score_rank=4, backend="torch")
_TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
_SWIN = dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4)
_STEPS, _LR = 3, 1e-2


@dataclass(frozen=True)
class Case:
    """One family: the timm model whose builder makes it (or "module.Class"), tiny sizes, and the targets."""

    family: str
    model: str
    sizes: dict = field(default_factory=dict)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    note: str = ""


CASES = (
    Case("vit", "vit_tiny_patch16_224", _TINY),
    Case("deit", "deit_tiny_distilled_patch16_224", _TINY),
    Case("deit3", "deit3_small_patch16_224", dict(_TINY, init_values=1.0)),
    Case("beit", "beit_base_patch16_224", dict(_TINY, init_values=1.0)),
    Case("eva02", "eva02_tiny_patch14_224", _TINY),
    Case("swin", "swin_tiny_patch4_window7_224", _SWIN, note="windowed attention; MLP on (B, H, W, C)"),
    Case("swinv2", "swinv2_tiny_window8_256", _SWIN, note="windowed attention; MLP on (B, H, W, C)"),
    Case("cait", "cait_xxs24_224", dict(_TINY, depth_token_only=1, init_values=1.0), ("qkv", "proj", "fc1", "fc2", "q", "k", "v"),
         note="talking-heads proj_l / proj_w mix heads (in_features = heads): narrower than the ranks, not targeted"),
    Case("xcit", "xcit_nano_12_p8_224", dict(_TINY, cls_attn_layers=1), ("qkv", "proj", "fc1", "fc2", "q", "k", "v"),
         note="convolutions (patch embedding, LPI) are not linear layers"),
    Case("convnext", "convnext_atto", dict(conv_mlp=False, ls_init_value=1.0, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), ("fc1", "fc2"),
         note="only the MLPs are linear layers (conv_mlp=False); MLP on (B, H, W, C)"),
    Case("mixer", "timm.models.mlp_mixer.MlpMixer", dict(img_size=32, patch_size=8, num_blocks=1, embed_dim=32),
         ("fc1", "fc2"), note="token MLPs too (in_features = tokens); narrower than the rank they would be refused"),
    Case("levit", "levit_128s", dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1)),
         ("linear",), note="every linear layer is inside a Linear+BatchNorm pair (LinearNorm), named linear"),
    Case("pit", "pit_ti_224", dict(img_size=32, patch_size=8, stride=4, base_dims=[16, 16], depth=[1, 1], heads=[2, 4]),
         ("qkv", "proj", "fc1", "fc2", "fc"), note="fc: the class token's projection between stages"),
    Case("twins", "twins_pcpvt_small", dict(img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2),
                                            sr_ratios=(2, 1), mlp_ratios=(2, 2)), ("q", "kv", "proj", "fc1", "fc2")),
)


def build(case: Case, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The case's tiny random-weight model (no classifier: pooled features), frozen, in eval mode.

    Random weights stand in for trained ones, so residual branches that timm starts (nearly) silent are made
    live, as a trained model's are: layer scales (DeiT III, BEiT, CaiT, ConvNeXt: ``init_values=1.0`` in the
    sizes) and Swin V2's post-norms, initialised to zero."""
    import timm

    torch.manual_seed(seed)
    if "." in case.model:
        module, name = case.model.rsplit(".", 1)
        import importlib

        model = getattr(importlib.import_module(module), name)(num_classes=0, **case.sizes)
    else:
        model = timm.create_model(case.model, num_classes=0, **case.sizes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None and not module.weight.any():
                module.weight.fill_(1.0)
    return model.to(dtype).requires_grad_(False).eval()


def images(seed: int, n: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _train(model: nn.Module, x: Tensor, target: Tensor, autocast: bool = False) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=_LR)
    for _ in range(_STEPS if not autocast else 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (model(x).float() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _run_task(model: nn.Module, x: Tensor, target: Tensor, autocast: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad(), collect_inputs(model) as stats:
            model(x)
        begin_task(model, stats)
    _train(model, x, target, autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad(), collect_inputs(model) as stats:
            model(x)
        end_task(model, stats)


@dataclass
class LayerMove:
    """One layer on its task-1 inputs X: how far its output moved, and what the memory allows."""

    name: str
    moved: float  # ||Y_after - Y_before||_F
    allowed: float  # ||dW||_2 ||(I - M M^T) X||_F
    outside: float  # ||(I - M M^T) X||_F^2 / ||X||_F^2, at most 1 - threshold
    threshold: float
    output: float  # ||Y_before||_F
    update: float  # ||dW||_F: whether task 2 changed the layer at all


@dataclass
class TwoTasks:
    model: nn.Module
    movement: float  # task 1's pooled features, relative (module docstring)
    learned: float  # task 2's pooled features: how far task 2's training moved them, relative
    layers: list[LayerMove]


def run_two_tasks(case: Case, thresholds: float | Sequence[float] | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> TwoTasks:
    """Task 1 then task 2 through the lifecycle on the case's injected model (in ``dtype``); measures what task 2
    did to task 1 (model and every layer) under task 1's gate."""
    model = build(case, seed, dtype)
    kwargs = dict(LAYER_KWARGS) if thresholds is None else dict(LAYER_KWARGS, thresholds=thresholds)
    inject(model, case.targets, **kwargs)
    x1, x2 = images(seed + 1, dtype=dtype), images(seed + 2, dtype=dtype)
    width = model(x1).shape[-1]
    targets = [torch.randn(1, width, generator=torch.Generator().manual_seed(seed + 10 + t)).to(dtype) for t in range(2)]
    _run_task(model, x1, targets[0])
    layers = dual_lora_layers(model)
    inputs: dict[str, Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, n=name: inputs.__setitem__(n, args[0].detach()))
             for name, layer in layers.items()]
    with torch.no_grad():
        set_gate(model, torch.tensor([1.0], dtype=dtype))
        before = model(x1)
        for h in hooks:
            h.remove()
        task2_before = model(x2)
        outputs = {name: layer(inputs[name]) for name, layer in layers.items()}
    kept = {name: (layer.weight.detach().clone(), layer.basis.detach().clone(), layer.threshold(0))
            for name, layer in layers.items()}
    set_gate(model, None)
    _run_task(model, x2, targets[1])
    with torch.no_grad():
        set_gate(model, torch.tensor([1.0, 0.0], dtype=dtype))
        after = model(x1)
        moves = [_layer_move(name, layer, inputs[name], outputs[name], *kept[name]) for name, layer in layers.items()]
        set_gate(model, torch.tensor([0.0, 1.0], dtype=dtype))
        task2_after = model(x2)
        set_gate(model, None)
    return TwoTasks(model, _relative(after, before), _relative(task2_after, task2_before), moves)


def _relative(new: Tensor, old: Tensor) -> float:
    return float((new.double() - old.double()).norm() / old.double().norm())


def _layer_move(name: str, layer: nn.Module, x: Tensor, y_before: Tensor, w_before: Tensor, m: Tensor,
                threshold: float) -> LayerMove:
    x2 = x.reshape(-1, x.shape[-1]).double()
    m = m.double()
    outside = x2 - (x2 @ m) @ m.T
    dw = layer.weight.double() - w_before.double()
    return LayerMove(
        name=name, moved=float((layer(x).double() - y_before.double()).norm()),
        allowed=float(torch.linalg.matrix_norm(dw, ord=2) * outside.norm()),
        outside=float(outside.square().sum() / x2.square().sum()), threshold=threshold,
        output=float(y_before.double().norm()), update=float(dw.norm()),
    )


# ------------------------------------------------------------------------------------------------ the survey

def _collapse(names: Sequence[str]) -> list[str]:
    """Qualified names with indices as '*', in first-seen order, with how many each stands for: 'blocks.*.attn.qkv x2'."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", n)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} x{c}" if c > 1 else k for k, c in counts.items()]


def describe(case: Case) -> dict[str, Any]:
    """What inject does to the case's model: its timm class, the adapted and the other linear layers, and the
    attention modules switched to call their qkv layer."""
    model = build(case)
    before = {name: getattr(parent, "qkv_bias_separate", None) for name, parent in model.named_modules()}
    others = linear_layers(model)
    adapted = inject(model, case.targets, **LAYER_KWARGS)
    switched = [f"{name}.qkv" for name, parent in model.named_modules()
                if before.get(name) is False and getattr(parent, "qkv_bias_separate", None) is True]
    return {
        "family": case.family, "model": case.model, "timm_class": type(model).__name__,
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in case.sizes.items()},
        "targets": list(case.targets), "adapted": _collapse(adapted),
        "not_adapted": _collapse([n for n in others if n not in adapted]),
        "qkv_switched_to_call_the_layer": _collapse(switched), "note": case.note,
    }


def survey(cases: Sequence[Case] = CASES) -> dict[str, Any]:
    """Every case described, with task 1's movement at the default thresholds (float32) and with thresholds=1.0
    (float64: what is left there is rounding and the 1e-12 of the energy that extend_basis may leave out)."""
    import timm

    rows = []
    for case in cases:
        row = describe(case)
        row["movement_default"] = float(f"{run_two_tasks(case).movement:.3g}")
        row["movement_threshold_1_float64"] = float(f"{run_two_tasks(case, 1.0, dtype=torch.float64).movement:.1g}")
        rows.append(row)
    return {"timm": timm.__version__, "torch": torch.__version__.split("+")[0], "layer_kwargs": LAYER_KWARGS,
            "steps": _STEPS, "lr": _LR, "families": rows}


def render(doc: dict[str, Any], source: str = "results/timm-families/families.json") -> str:
    """The README's timm-families section from the survey."""
    from .layer import DEFAULT_THRESHOLDS

    lines = [
        "### timm families: what `inject` adapts",
        "",
        f"Tiny random-weight models of {len(doc['families'])} timm families (timm {doc['timm']}, CPU), each injected "
        f"with its targets and taken through two tasks (`tests/test_timm_families.py`: outputs equal the original "
        "when injected, a strict `state_dict` round trip, `torch.compile(backend=\"aot_eager\")` equal to eager, a "
        "bf16-autocast step and the lifecycle inside autocast). *Moved*: how far task 1's pooled features moved "
        "while task 2 trained, under task 1's gate (`||f_after - f_before|| / ||f_before||`), at the default "
        f"thresholds {DEFAULT_THRESHOLDS[0]}/{DEFAULT_THRESHOLDS[1]} (float32) and with `thresholds=1.0` (M keeps all "
        "of task 1's input energy; run in float64, so that what is left is rounding, not float32's ~1e-4). Layers "
        "listed as `name xN` stand for N blocks. Source: "
        f"[{Path(source).name}]({source}) (`python -m duallora_kernels.timm_families`).",
        "",
        "| family | timm class | targets | adapted | not adapted (other linear layers) | moved, defaults | "
        "moved, thresholds=1.0 (float64) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["families"]:
        cells = [
            f"`{r['family']}` ({r['model']})", r["timm_class"], ", ".join(f"`{t}`" for t in r["targets"]),
            "<br>".join(f"`{a}`" for a in r["adapted"]), "<br>".join(f"`{a}`" for a in r["not_adapted"]) or "-",
            _moved(r["movement_default"]), f"{r['movement_threshold_1_float64']:.0e}",
            "; ".join(filter(None, [_switched(r["qkv_switched_to_call_the_layer"]), r["note"]])) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _moved(v: float) -> str:
    return f"{100 * v:.1f}%" if v >= 1e-3 else f"{v:.0e}"


def _switched(layers: list[str]) -> str:
    if not layers:
        return ""
    return ("fused qkv with q/v biases computed by F.linear on the layer's weight: inject switched the attention "
            "to call the layer (" + ", ".join(f"`{q}`" for q in layers) + ")")


def max_movement(doc: dict[str, Any]) -> float:
    """The largest movement at the defaults over the families (the README's introduction quotes it)."""
    return max(r["movement_default"] for r in doc["families"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duallora_kernels.timm_families", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=JSON_PATH, help="where to write the survey (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the recorded movements are float32 results: one thread, one summation order
    doc = survey()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

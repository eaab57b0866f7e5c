"""The class-incremental task loop of docs/method.md, its methods, checkpoints and results.

For each task t:
  1. a head block for t's classes is added;
  2. one pass over t's training data collects every adapted layer's inputs, and the adapters
     start from them (``begin_task``);
  3. the adapters and head t train on t's data only (gates one-hot on t);
  4. a second pass collects the trained model's inputs: the orthogonal adapter is folded, the
     residual block frozen, the memory bases extended (``end_task``);
  5. every task seen so far is evaluated with dynamic-memory gates and task-identity
     calibration; a checkpoint is written atomically.

Each task reseeds every random source from (seed, task), so a run resumed after task t
reaches the same results as one that never stopped. A run that starts from task 0 first moves
the outputs of an earlier run in the same folder into ``previous/``, so no stale results.json
sits beside the new run's checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_write_json
from ..memory import all_reduce_stats, check_finite_stats
from ..nn import begin_task, collect_inputs, dual_lora_layers, end_task, residual_off, set_gate
from . import distributed, metrics, record
from .calibration import calibrate_logits, clear_gates, first_pass_gate, model_task_gate
from .checkpoint import read_checkpoint, set_aside_earlier_outputs, tasks_done_on_disk, write_checkpoint
from .config import TrainConfig
from .data import Task, make_loader
from .datasets.images import for_epoch
from .datasets.preprocess import Preprocessing
from .datasets.stream import TaskStream, load_stream
from .execution import Execution, check_execution, training_step
from .growth import format_growth, memory_growth
from .prototypes import PROTOTYPE_SCORES, ClassPrototypes, PrototypeFeatures, collect_task_prototypes, prototype_gate
from .pretrain import sha256_of

__all__ = ["Trainer"]


@dataclass
class _History:
    accuracy: list[list[float]] = field(default_factory=list)  # R[t][j]
    task_id: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    basis_sizes: list[dict[str, int]] = field(default_factory=list)
    memory: list[dict[str, dict[str, int]] | None] = field(default_factory=list)  # growth.memory_growth per task
    checkpoint_bytes: list[int | None] = field(default_factory=list)  # task-<t>.safetensors' size (rank 0's)


class Trainer:
    """Runs one method of the class-incremental benchmark from a :class:`TrainConfig`.

    ``Trainer(config).run(resume=False)`` returns the results dict (also written as
    ``results.json`` and ``results.png`` in ``config.run_dir``).
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.progress = progress
        self.log = log or (lambda msg: print(msg, flush=True))
        self.backbone_label = ""
        self.backbone_sha256: str | None = None
        self.current_task: int | None = None  # the task in progress (None: setting up, or done)
        self.tasks_checkpointed = 0
        self.total_tasks: int | None = None
        self._load_at_start: float | None = None
        self.execution: Execution | None = None
        # the class-prototype statistics behind the task gate and the features they summarise (task_score
        # prototype-*; made with the model by build_model), None with subspace scores
        self.prototypes: ClassPrototypes | None = None
        self.prototype_features: PrototypeFeatures | None = None
        # the run's data (load_stream) and the image pipeline of its backbone (None: the embedded benchmark's)
        self.stream: TaskStream | None = None
        self.preprocessing: Preprocessing | None = None

    # ------------------------------------------------------------------ set-up (no file written)
    def _tasks(self) -> list[Task]:
        """The tasks of the loaded stream (:meth:`run` loads it before the model), decoded with the backbone's
        preprocessing."""
        tasks = self.stream.tasks(self.preprocessing)
        if self.config.method == "joint":  # one task holding every class: the upper bound
            tasks = [record.merge_tasks(tasks)]
        return tasks

    def _backbone(self) -> nn.Module:
        from ..vit import create_vit

        c = self.config
        if c.model is None:
            from .pretrain import LABEL, load_pretrained_backbone, shipped_backbone

            weights = shipped_backbone()  # checks the file's sha256
            self.backbone_label = f"{LABEL} [{weights.name}]"
            self.backbone_sha256 = sha256_of(weights)
            return load_pretrained_backbone(weights)
        sizes = dict(img_size=c.img_size, patch_size=c.patch_size, depth=c.depth, embed_dim=c.embed_dim,
                     num_heads=c.num_heads, in_chans=c.in_chans)
        model = create_vit(c.model, checkpoint=c.checkpoint, **{k: v for k, v in sizes.items() if v is not None})
        if c.dataset != "fashion-mnist":  # the user's images take the model's pipeline (datasets.preprocess)
            self.preprocessing = Preprocessing.of_model(model)
        self.backbone_label = f"timm {c.model}" + (f" from {c.checkpoint}" if c.checkpoint else " (random init: NOT pretrained)")
        self.backbone_sha256 = sha256_of(c.checkpoint) if c.checkpoint else None
        return model

    def build_model(self) -> nn.Module:
        from ..vit import ContinualViT

        c = self.config
        backbone = self._backbone()
        use_prototypes = c.task_score in PROTOTYPE_SCORES and c.method != "joint"
        self.prototypes = ClassPrototypes(c.task_score, c.prototype_shrinkage) if use_prototypes else None
        # the frozen pre-trained backbone the prototype features are read from: copied before the adapters go in
        reference = (copy.deepcopy(backbone).eval().requires_grad_(False)
                     if use_prototypes and c.prototype_features == "pretrained" else None)
        num_tasks = len(self.stream.sizes) if self.stream is not None else c.num_tasks  # the split's, also for joint
        model = ContinualViT(backbone, adapter=c.layer_kwargs(num_tasks), targets=c.targets)
        self.prototype_features = PrototypeFeatures(model, c.prototype_features, reference) if use_prototypes else None
        return model

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        self._load_at_start = record.load_average()
        ex = self.execution = check_execution(c)  # device, --amp, --compile: refused here, before any file
        torch.manual_seed(c.seed)
        if ex.rank != 0:  # one process speaks and writes: rank 0
            self.log, self.progress = (lambda msg: None), False
        self.stream = load_stream(c)  # data problems surface here, before anything is built or written
        model = self.build_model()
        tasks = self._tasks()
        distributed.check_world_size(ex.world, [
            (f"task {t}'s {what}", len(data), b) for t, task in enumerate(tasks)
            for what, data, b in (("training data", task.train, c.batch_size),
                                  ("training data (passes without gradients)", task.train, 2 * c.batch_size),
                                  ("test data", task.test, 2 * c.batch_size))])
        history, start = _History(), 0
        if resume:
            start = self._restore(model, history, tasks)
        model.to(ex.device)
        if self.prototype_features is not None and self.prototype_features.reference is not None:
            self.prototype_features.reference.to(ex.device)
        self.total_tasks, self.tasks_checkpointed = len(tasks), start
        run_dir = c.run_dir
        distributed.barrier()  # every rank has read the checkpoint before rank 0 moves files
        if ex.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            moved = set_aside_earlier_outputs(run_dir, start, len(tasks))
            if moved:
                self.log(f"[{c.name}] moved an earlier run's {', '.join(p.name for p in moved)} to {run_dir / 'previous'}/")
        distributed.barrier()
        if ex.world > 1:
            self.log(f"[{c.name}] {ex.world} processes ({torch.distributed.get_backend()}), each global batch of "
                     f"{c.batch_size} shared between them")
        if ex.amp_dtype is not None or ex.compile_backend is not None:
            self.log(f"[{c.name}] training step: autocast {c.amp}, torch.compile backend {ex.compile_backend or 'off'}")
        self.log(f"[{c.name}] backbone: {self.backbone_label}")
        self.log(f"[{c.name}] {record.data_title(c, self.stream)}, class order: {[list(t.classes) for t in tasks]} "
                 f"({self.stream.order_rule})")
        for t in range(start, len(tasks)):
            self.current_task = t
            t0 = time.perf_counter()
            self._train_task(model, tasks, t)
            row, tid = self._evaluate(model, tasks[: t + 1])
            history.accuracy.append(row)
            history.task_id.append(tid)
            history.seconds.append(time.perf_counter() - t0)
            history.basis_sizes.append({n: l.basis_size for n, l in dual_lora_layers(model).items()})
            history.memory.append(memory_growth(model))
            self.log(f"[{c.name}] after task {t} ({history.seconds[-1]:.0f} s):\n"
                     + metrics.format_matrix(history.accuracy, history.task_id) + "\n"
                     + format_growth(history.memory[-1], t))
            self._checkpoint(model, history, t)
        self.current_task = None
        results = record.results_dict(c, tasks, history, self.stream, backbone=self.backbone_label,
                                      backbone_sha256=self.backbone_sha256, load_at_start=self._load_at_start)
        distributed.barrier()
        if ex.rank == 0:
            atomic_write_json(run_dir / "results.json", results)
            metrics.plot_results(history.accuracy, run_dir / "results.png", record.plot_title(c, results, self.stream),
                                 history.task_id, **record.legend(c, results["class_order"], self.stream))
        distributed.barrier()
        s = results["summary"]
        self.log(f"[{c.name}] A_last {100 * s['A_last']:.2f}  A_avg {100 * s['A_avg']:.2f}  "
                 f"forgetting {100 * s['forgetting']:.2f}"
                 + (f"  task-id {100 * s['task_id_accuracy']:.1f}" if s["task_id_accuracy"] is not None else "")
                 + f"  -> {run_dir / 'results.json'}")
        return results

    def where_stopped(self) -> str:
        """Where a run stopped early, for a one-line message: the task in progress and what is checkpointed."""
        c = self.config
        if self.total_tasks is None:
            return f"interrupted while setting up run {c.name} (nothing written)"
        done, task = self.tasks_checkpointed, self.current_task
        # Ctrl-C can land after checkpoint.json (the commit point) is in place and before this object
        # records it: the file then names task `task` finished, and the run stands before the next one.
        if task is not None and done == task and tasks_done_on_disk(c.run_dir) == task + 1:
            done, task = task + 1, (task + 1 if task + 1 < self.total_tasks else None)
        kept = (f"tasks 0-{done - 1} are checkpointed in {c.run_dir}" if done > 1 else
                f"task 0 is checkpointed in {c.run_dir}" if done == 1 else "no task finished yet")
        if task is None:
            return f"interrupted in run {c.name} after its last task, while writing its results ({kept})"
        return f"interrupted in task {task} of {self.total_tasks} of run {c.name} ({kept})"

    def _seed(self, task: int) -> int:
        return self.config.seed * 1000 + task

    def _loader(self, dataset, batch_size: int, *, shuffle: bool, seed: int = 0):
        """A one-process loader, or under torchrun this rank's part of the same global batches
        (:mod:`.distributed`); --workers decode, pinned memory on a GPU."""
        ex = self.execution
        feed = dict(workers=ex.workers, pin_memory=ex.pin_memory) if ex is not None else {}
        if distributed.world_size() > 1:
            return distributed.sharded_loader(dataset, batch_size, shuffle=shuffle, seed=seed, **feed)
        return make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, **feed)

    def _collect(self, model: nn.Module, task: Task, desc: str, *, residual: bool = True) -> dict:
        """One pass over the task's training data; every adapted layer's input statistics, summed over ranks."""
        with torch.no_grad(), (contextlib.nullcontext() if residual else residual_off(model)), \
                collect_inputs(model) as stats:
            self._pass(model, task, desc)
        all_reduce_stats(stats)
        return stats

    def _train_task(self, model: nn.Module, tasks: Sequence[Task], t: int) -> None:
        c, task = self.config, tasks[t]
        ex = self.execution or check_execution(c)
        torch.manual_seed(self._seed(t))
        model.add_task_head(task.num_classes)
        model.heads[t].to(ex.device)
        model.eval()
        stats = self._collect(model, task, f"task {t}: collect inputs")
        for name, layer_stats in stats.items():  # NaN in the data: say so, not "linalg.eigh ... ill-conditioned"
            check_finite_stats(layer_stats, layer=name, task=t, when="start of task, before training")
        begin_task(model, stats, generator=torch.Generator().manual_seed(self._seed(t)))
        adapters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
        head = list(model.heads[t].parameters())
        groups = [{"params": head, "lr": c.head_lr}]
        if adapters:
            groups.append({"params": adapters, "lr": c.lr})
        opt = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
        model.train()
        step = self._training_step(model, t, task.label_offset, ex)
        scaler = torch.amp.GradScaler(ex.device.type, enabled=ex.amp_dtype == torch.float16)
        bar = tqdm(total=c.epochs * len(task.train), desc=f"task {t}: train", unit="img", unit_scale=True,
                   disable=not self.progress, leave=False)
        for epoch in range(c.epochs):
            seed = self._seed(t) * 100 + epoch  # the batches' order and, where the data augments, the augmentation
            loader = self._loader(for_epoch(task.train, seed), c.batch_size, shuffle=True, seed=seed)
            sizes = distributed.global_batch_sizes(len(task.train), c.batch_size)
            for x, y in loader:
                global_batch = next(sizes)
                # under torchrun: world / global batch size, the weight of this rank's summed loss
                weight = torch.tensor(ex.world / global_batch, device=ex.device)
                loss = step(x.to(ex.device, non_blocking=True), y.to(ex.device, non_blocking=True), weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                bar.update(global_batch)
                bar.set_postfix(epoch=f"{epoch + 1}/{c.epochs}", loss=f"{loss.item():.3f}")
        bar.close()
        if ex.world > 1:  # this task's DDP wrapper (and its gradient hooks on the adapters) goes now, not at some
            del step      # later garbage collection: the next task's wrapper must be the only one
            gc.collect()
        model.eval()
        stats = self._collect(model, task, f"task {t}: collect bases")
        task_stats = None
        if c.gate_source == "global" and self.prototypes is None and _has_residual_blocks(model):
            # The global gate is computed with the residual blocks off: U_t must see the same features.
            task_stats = self._collect(model, task, f"task {t}: collect task bases", residual=False)
        end_task(model, stats, task_stats)
        if self.prototypes is not None:  # after end_task: the model every later test of this task meets
            collect_task_prototypes(self.prototype_features, self.prototypes,
                                    self._loader(task.statistics_data, c.batch_size * 2, shuffle=False),
                                    model.task_label_ranges[t], ex.device)

    def _training_step(self, model: nn.Module, t: int, offset: int, ex: Execution) -> Callable:
        """``step(x, y, weight) -> loss`` of task t (:func:`.execution.training_step`)."""
        return training_step(model, t, offset, ex)

    def _pass(self, model: nn.Module, task: Task, desc: str) -> None:
        device = self.execution.device if self.execution else torch.device("cpu")
        data = task.statistics_data
        loader = self._loader(data, self.config.batch_size * 2, shuffle=False)
        with tqdm(total=len(data), desc=desc, unit="img", unit_scale=True, disable=not self.progress,
                  leave=False) as bar:
            for x, _ in loader:
                model.features(x.to(device, non_blocking=True))
                bar.update(len(x))

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, seen: Sequence[Task]) -> tuple[list[float], float | None]:
        c = self.config
        model.eval()
        ranges = model.task_label_ranges
        device = self.execution.device if self.execution else torch.device("cpu")
        counts = []  # (hits, total) per task, then task-identity (hits, total): summed over ranks
        tid_hits = tid_total = 0
        for j, task in enumerate(seen):
            hits = total = 0
            loader = self._loader(task.test, c.batch_size * 2, shuffle=False)
            for x, y in tqdm(loader, desc=f"evaluate task {j}", disable=not self.progress, leave=False):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits, gate = self._predict(model, x, len(ranges))
                if gate is not None:
                    if c.calibrated:
                        logits = calibrate_logits(logits, gate, ranges, c.beta)
                    tid_hits += int((gate.argmax(1) == j).sum())
                    tid_total += len(y)
                hits += int((logits.argmax(1) == y).sum())
                total += len(y)
            counts.append((hits, total))
        counts.append((tid_hits, tid_total))
        (summed,) = distributed.all_reduce_sum([torch.tensor(counts, dtype=torch.float64, device=device)])
        counts = [(int(h), int(n)) for h, n in summed.tolist()]
        (tid_hits, tid_total) = counts.pop()
        accs = [h / n for h, n in counts]
        return accs, (tid_hits / tid_total if tid_total and len(seen) > 1 else None)

    def _predict(self, model: nn.Module, x: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class-incremental logits and the model's task gate for a batch."""
        c = self.config
        hard = c.gate_mode == "hard"
        if c.gate_source == "global":
            gate = (prototype_gate(self.prototype_features, x, self.prototypes, num_tasks, c.prototype_temperature, hard)
                    if self.prototypes is not None else first_pass_gate(model, x, num_tasks, c.temperature, hard))
            set_gate(model, gate)
            try:
                return model(x), gate
            finally:
                set_gate(model, None)
        clear_gates(model)
        logits = model(x)
        return logits, model_task_gate(model, num_tasks, c.temperature, hard, samples=x.shape[0])

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, model: nn.Module, history: _History, t: int) -> None:
        distributed.barrier()  # every rank has finished task t (its state is the same on every rank)
        size = None
        if distributed.rank() == 0:
            tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            if self.prototypes is not None:  # after the last task: the score's weights, not the statistics
                tensors.update(self.prototypes.state_tensors(final=t + 1 == self.total_tasks))
            size = write_checkpoint(self.config.run_dir, t + 1, tensors, self.config, dataclasses.asdict(history))
        history.checkpoint_bytes.append(size)
        self.tasks_checkpointed = t + 1
        distributed.barrier()  # no rank goes on (or stops) before the checkpoint is complete

    def _restore(self, model: nn.Module, history: _History, tasks: Sequence[Task]) -> int:
        c = self.config
        found = read_checkpoint(c)
        if found is None:
            self.log(f"[{c.name}] --resume: no checkpoint in {c.run_dir}; starting from task 0")
            return 0
        state, tensors = found
        done = int(state["tasks_done"])
        for t in range(done):
            model.add_task_head(tasks[t].num_classes)
        if self.prototypes is not None:
            self.prototypes.load_state_tensors(tensors)
        model.load_state_dict(tensors)
        for name, value in state["history"].items():
            setattr(history, name, value)
        # a checkpoint made before growth / checkpoint sizes were recorded
        history.memory += [None] * (done - len(history.memory))
        history.checkpoint_bytes += [None] * (done - len(history.checkpoint_bytes))
        self.log(f"[{c.name}] resumed after task {done - 1} from {c.run_dir / 'checkpoint.json'}")
        return done


def _has_residual_blocks(model: nn.Module) -> bool:
    """Whether any residual block exists: without one a residual-off pass would repeat the last pass."""
    return any(bool(l.res_active) or l.frozen_tasks.numel() for l in dual_lora_layers(model).values())

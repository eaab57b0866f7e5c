"""Multi-process training (issue 9, items 4 and 5): two gloo processes on 127.0.0.1 equal one process over the
same global batches, keep bit-identical bases, keep the span(M) invariant, and resume; and the torchrun
command line refuses a world size larger than a batch before anything is written.

How batches are assigned (duallora_kernels/continual/distributed.py): both ranks draw the one-process run's
global batches (same seeded order, --batch-size samples) and rank r takes the r-th contiguous part of each;
each rank's summed loss is weighted by world / global batch size, so DDP's averaged gradient is the global
batch's mean-loss gradient. Batches of 13 over 32 samples (13, 13, 6) give parts of 7 and 6 samples: the
weighting is exercised, not only even splits.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.trainer import Trainer
from duallora_kernels.nn import dual_lora_layers

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="vit_tiny_patch16_224", patch_size=7, depth=1, embed_dim=16, num_heads=2,
             train_per_class=16, test_per_class=8, epochs=1, batch_size=13, num_tasks=3, rank_orth=2, rank_res=2,
             backend="torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recording(Trainer):
    """Keeps the model, each layer's weight and basis after every task (for the span(M) invariant), and
    every collected (all-reduced) input statistic, in order."""

    def build_model(self):
        self.model = super().build_model()
        self.after_task = []
        self.collected = []
        return self.model

    def _collect(self, model, task, desc, **kw):
        stats = super()._collect(model, task, desc, **kw)
        self.collected.append((desc, {n: (s.summary.clone() if s.summary_count else s.tokens.clone())
                                      for n, s in stats.items()}))
        return stats

    def _checkpoint(self, model, history, t):
        super()._checkpoint(model, history, t)
        self.after_task.append({n: (l.weight.detach().clone(), l.basis.detach().clone())
                                for n, l in dual_lora_layers(model).items()})


class _Interrupted(Exception):
    pass


class _StopsAfterTask1(Trainer):
    def _checkpoint(self, model, history, t):
        super()._checkpoint(model, history, t)
        if t == 1:
            raise _Interrupted


def _state(trainer: _Recording, results: dict) -> dict:
    layers = dual_lora_layers(trainer.model)
    return {"results": {k: results[k] for k in ("accuracy_matrix", "task_id_accuracy", "basis_sizes")},
            "bases": {n: l.basis.clone() for n, l in layers.items()},
            "task_bases": {n: l.task_bases.clone() for n, l in layers.items()},
            "weights": {n: l.weight.detach().clone() for n, l in layers.items()},
            "after_task": trainer.after_task, "collected": trainer.collected}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        quiet = dict(progress=False, log=lambda m: None)
        whole = _Recording(TrainConfig(**SMALL, out_dir=out, run_name="whole"), **quiet)
        state = _state(whole, whole.run())
        cut = TrainConfig(**SMALL, out_dir=out, run_name="cut")
        try:
            _StopsAfterTask1(cut, **quiet).run()
        except _Interrupted:
            pass
        resumed = _Recording(cut, **quiet)
        state["resumed"] = _state(resumed, resumed.run(resume=True))["results"]
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_keep_identical_bases_and_span_m(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(2))

    # every rank extends bit-identical bases (and task bases, and folded weights)
    for key in ("bases", "task_bases", "weights"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    assert r0["results"] == r1["results"]

    # equal to one process over the same global batches (float32 tolerance)
    torch.set_num_threads(1)
    single = _Recording(TrainConfig(**SMALL, out_dir=str(tmp_path / "single")), progress=False, log=lambda m: None)
    one = _state(single, single.run())
    # The two runs sum the same per-sample gradients and Gram statistics in another order (DDP adds
    # two partial sums; one process adds 13 terms), so they agree to float32 rounding, not bit for bit,
    # and how far depends on the CPU's BLAS. What is compared exactly is what rounding cannot move
    # here: the basis sizes (set by a threshold on the statistics' energy, far from it in this
    # configuration). An accuracy can move only if a test sample's two best logits tie to rounding,
    # so the accuracies may differ by at most one test sample per entry; the weights and bases, which
    # decide the outputs, are compared at float32 tolerance below.
    assert r0["results"]["basis_sizes"] == one["results"]["basis_sizes"]
    per_task = SMALL["test_per_class"] * TrainConfig(**SMALL).classes_per_task  # test samples of a task
    for t, (row, row_one) in enumerate(zip(r0["results"]["accuracy_matrix"], one["results"]["accuracy_matrix"])):
        assert len(row) == len(row_one) == t + 1
        assert row == pytest.approx(row_one, abs=1.0 / per_task + 1e-9), (t, row, row_one)
    for t, (acc, acc_one) in enumerate(zip(r0["results"]["task_id_accuracy"], one["results"]["task_id_accuracy"])):
        assert (acc is None) == (acc_one is None) and (acc is None or abs(acc - acc_one) <= 1.0 / (per_task * (t + 1)) + 1e-9)
    for key in ("bases", "weights"):
        for name in one[key]:
            a, b = r0[key][name], one[key][name]
            if key != "weights":  # basis vectors are defined up to sign: compare the projectors
                a, b = a @ a.transpose(-1, -2), b @ b.transpose(-1, -2)
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    # The task bases U_t are the top eigenvectors of each task's (all-reduced) statistics. The
    # statistics agree at the weights' tolerance; how far that moves an eigenvector subspace is set by
    # the eigengap at its last column (Davis-Kahan: ||sin(angles)||_F <= 2 min(sqrt(k) ||dG||_2,
    # ||dG||_F) / (l_k - l_{k+1})), so U_t is held to that bound, computed from the statistics, plus
    # float32's rounding of the eigenvectors themselves.
    assert [d for d, _ in r0["collected"]] == [d for d, _ in one["collected"]]
    for t in range(len(one["results"]["accuracy_matrix"])):
        source = [g for d, g in one["collected"] if d.startswith(f"task {t}: collect") and "inputs" not in d][-1]
        source_ddp = [g for d, g in r0["collected"] if d.startswith(f"task {t}: collect") and "inputs" not in d][-1]
        for name, u in one["task_bases"].items():
            g, g_ddp = source[name].double(), source_ddp[name].double()
            dg = g_ddp - g
            assert torch.linalg.matrix_norm(dg, 2) <= 1e-4 * torch.linalg.matrix_norm(g, 2), (t, name)
            k, d = u.shape[-1], g.shape[0]
            lam = torch.linalg.eigvalsh(g).flip(0)
            bound = 0.0 if k == d else (  # k = d: U_t spans everything, its projector is I either way
                2 * min(k**0.5 * torch.linalg.matrix_norm(dg, 2), torch.linalg.matrix_norm(dg)) / (lam[k - 1] - lam[k]))
            p, p_ddp = u[t] @ u[t].T, r0["task_bases"][name][t] @ r0["task_bases"][name][t].T
            assert (p_ddp.double() - p.double()).abs().max() <= bound + 1e-5, (t, name, bound)

    # the span(M) invariant under DDP: task t's folded update leaves inputs in span(M_{t-1}) unchanged
    gen = torch.Generator().manual_seed(0)
    for t in range(1, len(r0["after_task"])):
        for name, (w, _) in r0["after_task"][t].items():
            w_old, m_old = r0["after_task"][t - 1][name]
            probe = torch.randn(20, m_old.shape[1], generator=gen, dtype=torch.float64) @ m_old.double().T
            assert not torch.equal(w, w_old), (t, name)  # task t did change the layer
            moved = (probe @ (w.double() - w_old.double()).T).norm()
            assert moved <= 1e-5 * (probe @ w_old.double().T).norm(), (t, name)

    # --resume under two processes (stopped after task 1's checkpoint) reaches the uninterrupted results
    assert r0["resumed"] == r0["results"] and r1["resumed"] == r1["results"]
    # rank 0 alone wrote the run's files, and no half-written file is left
    run = out / "whole"
    assert json.loads((run / "results.json").read_text())["accuracy_matrix"] == r0["results"]["accuracy_matrix"]
    assert sorted(p.name for p in run.glob("task-*.safetensors")) == ["task-2.safetensors"]
    assert not list(out.rglob(".*.tmp"))


def test_torchrun_with_more_processes_than_a_batch_has_samples_is_a_one_line_error(tmp_path):
    # 2 test images per class, 1 class per task: each task's test data is one batch of 2 samples, shared
    # between 3 processes -> refused by every rank before anything is written; rank 0 says it once.
    out = tmp_path / "out"
    args = ["--model=vit_tiny_patch16_224", "--patch-size=7", "--depth=1", "--embed-dim=16", "--num-heads=2",
            "--train-per-class=8", "--test-per-class=2", "--classes-per-task=1", "--num-tasks=2",
            "--batch-size=8", "--no-progress", "--threads=1", f"--out-dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "duallora_kernels", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("duallora train: error:")]
    assert len(lines) == 1, proc.stderr
    assert "world size 3 is larger than the 2 sample(s)" in lines[0] and "--nproc-per-node 2" in lines[0]
    assert not out.exists()

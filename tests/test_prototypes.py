"""Class-prototype task scores (continual/prototypes.py) against a float64 numpy reference, and a run that
uses them (the gate, checkpoint and resume)."""
import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.special import logsumexp

from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.prototypes import ClassPrototypes, input_summaries, summarize_tokens
from duallora_kernels.continual.trainer import Trainer

from test_trainer import TINY


def _two_tasks(seed: int, dim: int = 6, n: int = 40):
    """Features of 2 tasks x 2 classes with distinct means, and their global labels."""
    g = np.random.default_rng(seed)
    tasks = []
    for t in range(2):
        labels = np.repeat([2 * t, 2 * t + 1], n // 2)
        means = g.normal(size=(4, dim)) * 2
        tasks.append((means[labels] + g.normal(size=(n, dim)), labels))
    return tasks


def _reference_scores(tasks, queries, score, shrinkage):
    """numpy float64: class means, within-class covariance shrunk to its mean eigenvalue, per-task logsumexp."""
    feats = np.concatenate([f for f, _ in tasks])
    labels = np.concatenate([y for _, y in tasks])
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    if score == "prototype-means":
        class_scores = -0.5 * ((queries[:, None, :] - means[None]) ** 2).sum(-1)
    else:
        centred = feats - means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(feats)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
        prec = np.linalg.inv(cov)
        class_scores = queries @ prec @ means.T - 0.5 * np.einsum("cd,de,ce->c", means, prec, means)
    owner = classes // 2
    return np.stack([logsumexp(class_scores[:, owner == t], axis=1) for t in range(2)], 1)


@pytest.mark.parametrize("score, shrinkage", [("prototype-lda", 0.0), ("prototype-lda", 0.3), ("prototype-means", 0.0)])
def test_task_scores_match_a_numpy_reference(score, shrinkage):
    tasks = _two_tasks(seed=hash((score, shrinkage)) % 1000)
    protos = ClassPrototypes(score, shrinkage)
    for t, (f, y) in enumerate(tasks):
        protos.add_task(torch.from_numpy(f), torch.from_numpy(y), range(2 * t, 2 * t + 2))
    queries = np.random.default_rng(7).normal(size=(9, 6)) * 2
    got = protos.task_scores(torch.from_numpy(queries)).numpy()
    want = _reference_scores(tasks, queries, score, shrinkage)
    # scores are defined up to a constant per sample: compare them minus each row's mean
    np.testing.assert_allclose(got - got.mean(1, keepdims=True), want - want.mean(1, keepdims=True),
                               rtol=1e-9, atol=1e-9)


def test_statistics_survive_a_checkpoint_and_bad_input_is_refused():
    tasks = _two_tasks(seed=3)
    protos = ClassPrototypes("prototype-lda", 1e-3)
    for t, (f, y) in enumerate(tasks):
        protos.add_task(torch.from_numpy(f), torch.from_numpy(y), range(2 * t, 2 * t + 2))
    tensors = protos.state_tensors()
    restored = ClassPrototypes("prototype-lda", 1e-3)
    restored.load_state_tensors(dict(tensors))
    q = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(restored.task_scores(q), protos.task_scores(q)) and restored.task_of_class == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="every class of the task needs samples"):
        ClassPrototypes().add_task(torch.randn(4, 6), torch.tensor([0, 0, 0, 0]), range(0, 2))
    with pytest.raises(ValueError, match="score must be one of"):
        ClassPrototypes("subspace")
    with pytest.raises(RuntimeError, match="add_task first"):
        ClassPrototypes().task_scores(q)


@pytest.mark.parametrize("score", ["prototype-lda", "prototype-means"])
def test_checkpoints_keep_what_the_score_needs_exactly_and_compactly(score):
    (f0, y0), (f1, y1) = [(torch.from_numpy(f), torch.from_numpy(y)) for f, y in _two_tasks(seed=5)]
    q, d, key = torch.randn(7, 6, dtype=torch.float64), 6, "task_identity."
    protos = ClassPrototypes(score, 1e-3)
    protos.add_task(f0, y0, range(0, 2))
    middle = protos.state_tensors()  # a task follows: the statistics it adds to
    lda = score == "prototype-lda"
    extra = {key + "gram_upper"} if lda else set()  # the means score keeps no second moment at all
    assert set(middle) == {key + "task_of_class", key + "sums", key + "counts", *extra}
    if lda:  # f f^T summed is exactly symmetric: its upper triangle, row by row, is all of it
        assert torch.equal(middle[key + "gram_upper"], protos.gram[torch.triu_indices(d, d).unbind()])
    resumed = ClassPrototypes(score, 1e-3)
    resumed.load_state_tensors(dict(middle))
    assert resumed.gram is None if not lda else torch.equal(resumed.gram, protos.gram)
    for p in (protos, resumed):
        p.add_task(f1, y1, range(2, 4))
    assert torch.equal(resumed.task_scores(q), protos.task_scores(q))  # the next task's scores, to the bit

    last = protos.state_tensors(final=True)  # no task follows: the class weights and biases the score applies
    assert set(last) == {key + "task_of_class", key + "class_weights", key + "class_bias"}
    assert last[key + "class_weights"].shape == (4, d) and last[key + "class_bias"].shape == (4,)
    finished = ClassPrototypes(score, 1e-3)
    finished.load_state_tensors(dict(last))
    assert torch.equal(finished.task_scores(q), protos.task_scores(q)) and finished.task_of_class == [0, 0, 1, 1]
    assert set(finished.state_tensors()) == set(last)  # written again: still the final form
    with pytest.raises(RuntimeError, match="no task can be added"):
        finished.add_task(f1, y1, range(4, 6))


def test_an_asymmetric_or_an_older_full_second_moment_is_kept_and_read_whole():
    (f0, y0), _ = [(torch.from_numpy(f), torch.from_numpy(y)) for f, y in _two_tasks(seed=6)]
    protos = ClassPrototypes("prototype-lda", 1e-3)
    protos.add_task(f0, y0, range(0, 2))
    protos.gram[0, 1] += 1e-9  # not symmetric (no run makes one): the triangle would lose it
    state = protos.state_tensors()
    assert "task_identity.gram" in state and "task_identity.gram_upper" not in state
    restored = ClassPrototypes("prototype-lda", 1e-3)
    restored.load_state_tensors(dict(state))  # also the form every checkpoint had before
    assert torch.equal(restored.gram, protos.gram)


def test_token_summaries_are_the_tokens_mean_and_std():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    ref = np.concatenate([x.numpy().mean(1), x.numpy().std(1)], 1)
    np.testing.assert_allclose(summarize_tokens(x).numpy(), ref, rtol=1e-12, atol=1e-12)
    layer = torch.nn.Linear(4, 2).double()
    with input_summaries({"l": layer}) as features:
        layer(x)
        np.testing.assert_allclose(features().numpy(), ref, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match="no forward reached"):
            features()


def test_a_run_gates_by_prototypes_of_the_frozen_backbone_and_resumes_to_the_same_results(tmp_path):
    cfg = dict(TINY, task_score="prototype-lda", prototype_shrinkage=1e-2, epochs=2)
    trainer = Trainer(TrainConfig(**cfg, out_dir=str(tmp_path / "whole")), progress=False, log=lambda m: None)
    whole = trainer.run()
    assert trainer.prototypes.num_tasks == 3 and trainer.prototypes.task_of_class == [0, 0, 1, 1, 2, 2]
    # the reference backbone is the pre-trained one: the adapters' folds into W0 did not reach it
    model = trainer.build_model()
    ref = trainer.prototype_features.reference
    for name, param in ref.named_parameters():
        assert torch.equal(param, model.backbone.get_parameter(name)), name
    assert 0 <= whole["task_id_accuracy"][-1] <= 1
    # stopped in task 2 (tasks 0-1 checkpointed), then resumed: the prototype statistics come back with it
    cut = TrainConfig(**cfg, out_dir=str(tmp_path / "cut"))
    train_task = Trainer._train_task

    def stop_at_task_2(self, model, tasks, t):
        if t == 2:
            raise KeyboardInterrupt
        return train_task(self, model, tasks, t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_train_task", stop_at_task_2)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cut, progress=False, log=lambda m: None).run()
    resumed = Trainer(cut, progress=False, log=lambda m: None).run(resume=True)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["task_id_accuracy"] == whole["task_id_accuracy"]
    # each task's checkpoint size, the resumed run's too: while tasks remain the statistics (the second
    # moment's triangle), after the last only the class weights
    sizes = whole["checkpoint_bytes_per_task"]
    assert resumed["checkpoint_bytes_per_task"] == sizes and len(sizes) == 3
    run = tmp_path / "whole" / "duallora-seed0"
    assert sizes[-1] == (run / "task-2.safetensors").stat().st_size
    with safe_open(run / "task-2.safetensors", "pt") as f:
        identity = {k for k in f.keys() if k.startswith("task_identity.")}
    assert identity == {"task_identity.task_of_class", "task_identity.class_weights", "task_identity.class_bias"}


def test_prototype_scores_need_the_global_gate():
    with pytest.raises(ValueError, match="needs gate_source='global'"):
        TrainConfig(task_score="prototype-lda", gate_source="layer")
    with pytest.raises(ValueError, match="task_score must be one of"):
        TrainConfig(task_score="lda")


def test_a_run_recorded_before_task_scores_existed_reads_as_subspace():
    old = {k: v for k, v in TrainConfig().to_json().items() if not k.startswith(("task_score", "prototype_"))}
    assert TrainConfig.from_json(old).task_score == "subspace"
    assert TrainConfig.from_json(TrainConfig().to_json()).task_score == "prototype-lda"

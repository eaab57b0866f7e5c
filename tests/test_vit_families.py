"""create_vit / ContinualViT / duallora train beyond timm's VisionTransformer: DeiT, DeiT III, BEiT, EVA-02 and
Swin, from checkpoints made at the families' real pre-training input (224x224 RGB, their own patch and window
sizes) loaded into a 28x28 grey-scale model; Swin's windows under a per-image gate."""
import pytest
import torch
from safetensors.torch import save_file

from duallora_kernels.continual.calibration import first_pass_gate
from duallora_kernels.nn import begin_task, collect_inputs, dual_lora_layers, end_task, set_gate
from duallora_kernels.vit import ContinualViT, create_vit

# The family's smallest real configuration, made shallow (the loader's work is per tensor, not per block).
REAL = {
    "deit": ("deit_tiny_distilled_patch16_224", dict(depth=1)),
    "deit3": ("deit3_small_patch16_224", dict(depth=1)),
    "beit": ("beit_base_patch16_224", dict(depth=1)),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=1)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1))),
}
GREY28 = dict(img_size=28, patch_size=4, in_chans=1)


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("family", list(REAL))
def test_a_real_checkpoint_loads_into_a_small_grey_model_and_adapts(family, tmp_path, gen):
    name, depth = REAL[family]
    torch.manual_seed(0)
    source = create_vit(name, num_classes=1000, **depth)  # random weights at the pre-training input size
    with torch.no_grad():  # beit/eva start their q/v biases at zero: give them values the load must carry
        for n, p in source.named_parameters():
            if n.endswith(("q_bias", "v_bias")):
                p.normal_(generator=gen)
    _save(source, tmp_path / "real.safetensors")
    model = create_vit(name, **GREY28, **depth, checkpoint=tmp_path / "real.safetensors").eval()
    assert model.patch_embed.proj.weight.shape[1:] == (1, 4, 4)
    same = [n for n, t in model.state_dict().items()
            if n in source.state_dict() and t.shape == source.state_dict()[n].shape and "qkv.weight" in n]
    assert same and all(torch.equal(model.state_dict()[n], source.state_dict()[n]) for n in same)
    x = torch.randn(3, 1, 28, 28, generator=gen)
    before = model(x)
    assert before.shape == (3, model.num_features) and before.isfinite().all()
    wrapped = ContinualViT(model, adapter=dict(rank_orth=2, rank_res=2, score_rank=2, backend="torch")).eval()
    blocks = "layers" if family == "swin" else "blocks"
    assert any(n.startswith(f"backbone.{blocks}.") and n.endswith("attn.qkv") for n in wrapped.adapted_layers)
    assert {n.rsplit(".", 1)[-1] for n in wrapped.adapted_layers} == {"qkv", "proj", "fc1", "fc2"}
    torch.testing.assert_close(wrapped.features(x), before, rtol=1e-5, atol=1e-5)
    with collect_inputs(wrapped) as stats:  # every adapted layer runs (beit's fused qkv too)
        wrapped.features(x)
    assert all(s.token_count > 0 for s in stats.values())


def test_eva02_base_names_its_qkv_and_fc1_otherwise():
    model = create_vit("eva02_base_patch14_224", **GREY28, depth=1, embed_dim=32, num_heads=2)
    wrapped = ContinualViT(model, adapter=dict(rank_orth=2, rank_res=2, score_rank=2))
    assert sorted(n.rsplit(".", 1)[-1] for n in wrapped.adapted_layers) == [
        "fc1_g", "fc1_x", "fc2", "k_proj", "proj", "q_proj", "v_proj"]


def test_other_families_are_refused_in_one_line_naming_the_supported_ones():
    with pytest.raises(ValueError) as err:
        create_vit("convnext_atto", in_chans=1)
    text = str(err.value)
    assert "\n" not in text and "ConvNeXt" in text and "swin (swin_*)" in text and "beit (beit_*" in text
    with pytest.raises(ValueError, match=r"Swin takes depths=\(\.\.\.\) and num_heads=\(\.\.\.\) per stage"):
        create_vit("swin_tiny_patch4_window7_224", **GREY28, depth=2)


def test_swin_windows_take_each_image_s_own_row_of_a_global_gate(gen):
    # Swin's attention sees (B * windows, N, d) and its MLP (B, H, W, d): a per-image gate (B, T) must reach
    # every window of its own image. Batched with a gate == each image alone with its gate row.
    torch.manual_seed(0)
    backbone = create_vit("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, in_chans=1, embed_dim=8,
                          depths=(1, 1), num_heads=(1, 2), window_size=4)
    model = ContinualViT(backbone, adapter=dict(rank_orth=2, rank_res=2, score_rank=2, backend="torch"))
    tasks = [torch.randn(4, 1, 32, 32, generator=gen) + 2 * t for t in range(2)]
    for x in tasks:
        with torch.no_grad(), collect_inputs(model) as stats:
            model.features(x)
        begin_task(model, stats)
        with torch.no_grad():
            for layer in dual_lora_layers(model).values():
                layer.orth_b.normal_(0, 0.1, generator=gen)
                layer.res_b.normal_(0, 0.1, generator=gen)
        with torch.no_grad(), collect_inputs(model) as stats:
            model.features(x)
        end_task(model, stats)
    model.eval()
    x = torch.cat([tasks[0][:2], tasks[1][:2]])
    with torch.no_grad():
        gate = first_pass_gate(model, x, num_tasks=2, temperature=0.1)
        assert gate.shape == (4, 2) and torch.allclose(gate.sum(1), torch.ones(4))
        gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.3], [0.2, 0.8]])
        set_gate(model, gate)
        batched = model.features(x)
        alone = []
        for i in range(4):
            set_gate(model, gate[i:i + 1])
            alone.append(model.features(x[i:i + 1]))
        set_gate(model, None)
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, sizes, argv", [
    ("beit_base_patch16_224", dict(depth=1, embed_dim=32, num_heads=2),
     ["--depth=1", "--embed-dim=32", "--num-heads=2", "--patch-size=4"]),
    # Swin's stages take no --depth: the whole swin_tiny, narrowed (--embed-dim), with the cheaper task score
    ("swin_tiny_patch4_window7_224", dict(embed_dim=24), ["--embed-dim=24", "--task-score=subspace"]),
], ids=["beit", "swin"])
def test_duallora_train_runs_a_family_from_its_checkpoint(name, sizes, argv, tmp_path):
    import json

    from duallora_kernels import cli

    torch.manual_seed(0)
    _save(create_vit(name, num_classes=1000, **sizes), tmp_path / "real.safetensors")
    out = tmp_path / "out"
    assert cli.main(["train", f"--model={name}", f"--checkpoint={tmp_path / 'real.safetensors'}", *argv,
                     "--num-tasks=2", "--train-per-class=4", "--test-per-class=4", "--epochs=1", "--batch-size=8",
                     "--rank-orth=2", "--rank-res=2", "--no-progress", f"--out-dir={out}"]) == 0
    results = json.loads((out / "duallora-seed0" / "results.json").read_text())
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert results["task_id_accuracy"][1] is not None and name in results["backbone"]

"""create_vit (sizes, offline checkpoints and their adaptation, errors) and the ContinualViT wrapper."""
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from duallora_kernels.vit import ContinualViT, create_vit, load_state_dict_file

SMALL = dict(img_size=28, patch_size=4, depth=2, embed_dim=32, num_heads=4, in_chans=1)


def small_vit(**overrides):
    return create_vit(**{**SMALL, **overrides})


def images(gen, n=3, chans=1, size=28):
    return torch.randn(n, chans, size, size, generator=gen)


def test_custom_sizes(gen):
    model = small_vit().eval()
    assert len(model.blocks) == 2 and model.embed_dim == 32 and model.blocks[0].attn.num_heads == 4
    assert model.pos_embed.shape == (1, 7 * 7 + 1, 32)  # 28/4 = 7 patches a side, plus the class token
    assert model.patch_embed.proj.weight.shape == (32, 1, 4, 4)
    assert model(images(gen)).shape == (3, 32)  # num_classes=0: pooled features
    assert create_vit(**SMALL, num_classes=5)(images(gen)).shape == (3, 5)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_vit(**{**SMALL, "num_heads": 5})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_vit(**{**SMALL, "patch_size": 5})


def test_patch_size_that_does_not_divide_the_image_suggests_ones_that_do():
    # A vit_*_patch16 model on 28x28 Fashion-MNIST images: the first thing a new user tries.
    with pytest.raises(ValueError, match=r"img_size \(28, 28\) is not a multiple of patch_size \(16, 16\) .*"
                                         r"e\.g\. patch_size=4 or 7 \(duallora train --patch-size 4\)"):
        create_vit("vit_tiny_patch16_224", img_size=28, in_chans=1, depth=1)
    with pytest.raises(ValueError, match=r"patch_size=14 or 16 \(duallora train --patch-size 14\)"):
        create_vit("vit_tiny_patch16_224", img_size=224, patch_size=15, depth=1)
    with pytest.raises(ValueError, match="pass a patch_size that divides 13"):  # a prime side: nothing fits
        create_vit("vit_tiny_patch16_224", img_size=13, patch_size=4, depth=1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, gen, suffix):
    source = small_vit().eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict()}, path)  # the {"model": ...} container is unwrapped
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_vit(**SMALL, checkpoint=path).eval()
    x = images(gen)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_mismatched_head_is_dropped(tmp_path, gen):
    source = create_vit(**SMALL, num_classes=7).eval()
    torch.save(source.state_dict(), tmp_path / "with_head.pth")
    x = images(gen)
    features = source.forward_head(source.forward_features(x), pre_logits=True)

    headless = create_vit(**SMALL, checkpoint=tmp_path / "with_head.pth").eval()
    torch.testing.assert_close(headless(x), features, rtol=0, atol=0)

    other_head = create_vit(**SMALL, num_classes=3, checkpoint=tmp_path / "with_head.pth").eval()
    assert other_head.head.weight.shape == (3, 32)
    torch.testing.assert_close(other_head.forward_head(other_head.forward_features(x), pre_logits=True), features)

    same_head = create_vit(**SMALL, num_classes=7, checkpoint=tmp_path / "with_head.pth").eval()
    torch.testing.assert_close(same_head(x), source(x), rtol=0, atol=0)  # a head that fits is kept


def test_pos_embed_resampled_to_the_new_grid(tmp_path, gen):
    source = create_vit(**{**SMALL, "img_size": 16})  # 4x4 grid
    with torch.no_grad():
        # Constant over the grid per channel: resampling must keep it; the class token is never resampled.
        source.pos_embed[:, 1:] = torch.randn(1, 1, 32, generator=gen)
        source.pos_embed[:, :1] = torch.randn(1, 1, 32, generator=gen)
    torch.save(source.state_dict(), tmp_path / "small_grid.pth")
    model = create_vit(**SMALL, checkpoint=tmp_path / "small_grid.pth")  # 7x7 grid
    assert model.pos_embed.shape == (1, 50, 32)
    torch.testing.assert_close(model.pos_embed[:, :1], source.pos_embed[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed[:, 1:], source.pos_embed[:, 1:2].expand(1, 49, 32),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight, rtol=0, atol=0)


def test_patch_kernel_and_channels_adapted(tmp_path, gen):
    source = create_vit(**{**SMALL, "img_size": 32, "patch_size": 8, "in_chans": 3})
    torch.save(source.state_dict(), tmp_path / "rgb_p8.pth")
    model = create_vit(**SMALL, checkpoint=tmp_path / "rgb_p8.pth")
    assert model.patch_embed.proj.weight.shape == (32, 1, 4, 4)
    assert model(images(gen)).isfinite().all()
    # Same patch size, RGB -> grey: the channels are summed (timm's adapt_input_conv).
    model = create_vit(**{**SMALL, "img_size": 32, "patch_size": 8}, checkpoint=tmp_path / "rgb_p8.pth")
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))


def test_wrapped_state_dict_prefix_is_stripped(tmp_path, gen):
    wrapped = ContinualViT(small_vit())
    wrapped.add_task_head(2)
    torch.save(wrapped.state_dict(), tmp_path / "continual.pth")  # keys "backbone.*" and "heads.0.*"
    model = create_vit(**SMALL, checkpoint=tmp_path / "continual.pth").eval()
    x = images(gen)
    torch.testing.assert_close(model(x), wrapped.eval().features(x), rtol=0, atol=0)


def test_wrong_shape_checkpoint_names_the_tensors(tmp_path):
    torch.save(create_vit(**{**SMALL, "embed_dim": 48}).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError) as err:
        create_vit(**SMALL, checkpoint=tmp_path / "wide.pth")
    text = str(err.value)
    assert "wide.pth" in text and "cls_token: checkpoint (1, 1, 48), model (1, 1, 32)" in text
    assert "embed_dim=48" in text and "depth=2" in text

    torch.save(create_vit(**{**SMALL, "depth": 3}).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"Not in the model: blocks\.2\.") as err:
        create_vit(**SMALL, checkpoint=tmp_path / "deep.pth")
    assert "depth=3" in str(err.value)
    with pytest.raises(ValueError, match=r"Missing from the checkpoint: blocks\.2\."):
        create_vit(**{**SMALL, "depth": 3}, checkpoint=tmp_path / "wide.pth")


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_vit(**SMALL, checkpoint=tmp_path / "missing.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        create_vit(**SMALL, checkpoint=tmp_path / "junk.safetensors")
    torch.save(small_vit().state_dict(), tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="not both"):
        create_vit(**SMALL, checkpoint=tmp_path / "ok.pth", pretrained=True)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_unknown_and_non_vit_models():
    with pytest.raises(ValueError, match="unknown timm model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        create_vit("vit_tiny_patch16_2244")
    with pytest.raises(ValueError, match="not a VisionTransformer"):
        create_vit("resnet10t")


# ------------------------------------------------------------------------------------------------- wrapper


def test_continual_vit_heads_concatenate(gen):
    model = ContinualViT(small_vit())
    assert all(not p.requires_grad for p in model.backbone.parameters())  # pre-trained weights stay frozen
    with pytest.raises(RuntimeError, match="add_task_head"):
        model(images(gen))
    assert model.add_task_head(2) == 0 and model.add_task_head(3) == 1
    assert model.num_tasks == 2 and model.num_classes == 5
    assert model.task_label_ranges == [range(0, 2), range(2, 5)]
    assert not model.heads[0].weight.requires_grad and model.heads[1].weight.requires_grad
    model.eval()
    x = images(gen, n=4)
    z = model.features(x)
    assert z.shape == (4, 32)
    per_task = model.logits_per_task(x)
    assert [t.shape for t in per_task] == [(4, 2), (4, 3)]
    logits = model(x)
    torch.testing.assert_close(logits, torch.cat([model.heads[0](z), model.heads[1](z)], -1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"heads.1.weight", "heads.1.bias"}


def test_backbone_head_is_removed(gen):
    backbone = create_vit(**SMALL, num_classes=10)
    model = ContinualViT(backbone, freeze_backbone=False)
    assert model.features(images(gen)).shape == (3, 32)
    assert any(p.requires_grad for p in model.backbone.parameters())


def test_targets_must_name_linear_layers_in_blocks():
    with pytest.raises(ValueError) as err:
        ContinualViT(small_vit(), adapter={}, targets=("q_proj", "fc1"))
    text = str(err.value)
    assert "['q_proj']" in text and "attn.qkv" in text and "mlp.fc2" in text


def test_adapter_none_injects_nothing():
    model = ContinualViT(small_vit(), adapter=None)
    assert model.adapted_layers == []
    assert type(model.backbone.blocks[0].attn.qkv) is nn.Linear


def test_inject_is_called_on_the_blocks(monkeypatch):
    calls = []

    def fake_inject(module, targets=("qkv", "proj", "fc1", "fc2"), **layer_kwargs):
        calls.append((module, targets, layer_kwargs))
        return [f"{i}.attn.qkv" for i in range(len(module))]

    monkeypatch.setitem(sys.modules, "duallora_kernels.nn", types.SimpleNamespace(inject=fake_inject))
    backbone = small_vit()
    model = ContinualViT(backbone, adapter=dict(rank_orth=4, rank_res=2), targets=("qkv", "fc*"))
    (module, targets, kwargs), = calls
    assert module is backbone.blocks and targets == ("qkv", "fc*") and kwargs == dict(rank_orth=4, rank_res=2)
    assert model.adapted_layers == ["backbone.blocks.0.attn.qkv", "backbone.blocks.1.attn.qkv"]


def test_real_inject_keeps_outputs_until_adapters_train(gen):
    dual_nn = pytest.importorskip("duallora_kernels.nn")
    backbone = small_vit().eval()
    x = images(gen)
    before = backbone(x)
    model = ContinualViT(backbone, adapter=dict(rank_orth=4, rank_res=2, backend="torch")).eval()
    assert len(model.adapted_layers) == 2 * 4
    assert "backbone.blocks.1.mlp.fc2" in model.adapted_layers
    assert isinstance(model.backbone.blocks[1].mlp.fc2, dual_nn.DualLoRALinear)
    torch.testing.assert_close(model.features(x), before, rtol=1e-5, atol=1e-5)

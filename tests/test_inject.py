"""inject(): all or nothing, targets by qualified name, layers refused up front by name; the model-level
lifecycle's errors name the layer, and a collecting pass that misses a layer says which."""
import pytest
import torch
from torch import nn

import duallora_kernels.inject as inject_module
from duallora_kernels.nn import DualLoRALinear, begin_task, collect_inputs, dual_lora_layers, end_task, inject
from helpers import randn, rel_err

F64 = torch.float64


class Mixer(nn.Module):
    """Two MLPs whose layers share last names (timm's Mixer: tokens and channels), one of them narrow."""

    def __init__(self, tokens: int = 3, dim: int = 16):
        super().__init__()
        self.tokens = nn.Sequential()
        self.tokens.fc1, self.tokens.fc2 = nn.Linear(tokens, 8), nn.Linear(8, tokens)
        self.channels = nn.Sequential()
        self.channels.fc1, self.channels.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):  # (B, tokens, dim)
        x = x + self.tokens.fc2(torch.relu(self.tokens.fc1(x.transpose(1, 2)))).transpose(1, 2)
        return x + self.channels.fc2(torch.relu(self.channels.fc1(x)))


def _state(model: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
    return {n: (type(m), m.weight.detach().clone()) for n, m in model.named_modules() if hasattr(m, "weight")}


def test_layers_that_cannot_take_the_rank_are_refused_up_front_and_nothing_changes():
    model = Mixer().to(F64)
    before = _state(model)
    with pytest.raises(ValueError) as err:
        inject(model, targets=("fc1", "fc2"), rank_orth=4, rank_res=2)
    text = str(err.value)
    assert "\n" not in text and text.startswith("inject changed nothing: 1 of the 4 targeted layers cannot be adapted")
    assert "tokens.fc1 (rank_orth and rank_res must be <= in_features=3)" in text and "channels" not in text
    after = _state(model)
    assert after.keys() == before.keys()
    for name, (kind, weight) in before.items():
        assert after[name][0] is kind and torch.equal(after[name][1], weight), name
    assert not dual_lora_layers(model)


def test_dotted_targets_match_the_qualified_name(gen):
    model = Mixer().to(F64)
    x = randn(2, 3, 16, gen=gen)
    y0 = model(x)
    names = inject(model, targets=("channels.fc*", "*.fc2"), rank_orth=2, rank_res=1)
    assert names == ["tokens.fc2", "channels.fc1", "channels.fc2"]
    assert type(model.tokens.fc1) is nn.Linear
    assert rel_err(model(x), y0) == 0.0


def test_a_failure_while_replacing_puts_every_original_back(monkeypatch):
    model = Mixer(tokens=8).to(F64)
    before = _state(model)
    made = []
    real = DualLoRALinear.from_linear.__func__

    def failing(cls, linear, **kw):
        if len(made) == 2:
            raise MemoryError("out of memory (simulated)")
        made.append(linear)
        return real(cls, linear, **kw)

    monkeypatch.setattr(inject_module.DualLoRALinear, "from_linear", classmethod(failing))
    with pytest.raises(MemoryError):
        inject(model, targets=("fc1", "fc2"), rank_orth=2, rank_res=1)
    assert len(made) == 2 and not dual_lora_layers(model)
    for name, (kind, weight) in before.items():
        assert type(model.get_submodule(name)) is kind and model.get_submodule(name).weight is not None, name


def test_timm_style_fused_qkv_attention_is_switched_to_call_the_layer(gen):
    class FusedQKV(nn.Module):  # what timm's beit / eva / swinv2 attention does
        def __init__(self, dim=8):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.qkv_bias_separate = False

        def forward(self, x):
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += bias
                return qkv
            return nn.functional.linear(x, self.qkv.weight, bias)

    attn = FusedQKV().to(F64)
    x = randn(2, 5, 8, gen=gen)
    y0 = attn(x)
    inject(attn, targets=("qkv",), rank_orth=2, rank_res=1)
    assert attn.qkv_bias_separate is True
    assert rel_err(attn(x), y0) <= 1e-15
    with collect_inputs(attn) as stats:
        attn(x)
    assert stats["qkv"].token_count == 10
    attn.qkv_bias_separate = False  # the bypass back: the collecting pass says which layer it missed
    with pytest.raises(ValueError, match=r"1 of the 1 DualLoRA layers saw no input in the pass: qkv\. .*F\.linear"):
        with collect_inputs(attn):
            attn(x)
    with pytest.raises(ValueError, match="1 of the 1 DualLoRA layers saw no input in the pass: qkv. Either the block "
                                         "ran no data through the model, or the model ran without calling them"):
        with collect_inputs(attn):
            pass


def test_model_lifecycle_errors_name_the_layer_and_change_no_layer(gen):
    model = Mixer(tokens=8).to(F64)
    inject(model, targets=("fc1", "fc2"), rank_orth=2, rank_res=1)
    x = randn(2, 8, 16, gen=gen)
    with collect_inputs(model) as stats:
        model(x)
    wrong = dict(stats, **{"channels.fc2": stats["channels.fc1"]})  # statistics of another width
    with pytest.raises(ValueError, match=r"^layer 'channels.fc2': stats are for d=16 but this layer has in_features=32$"):
        begin_task(model, wrong)
    assert not any(layer._in_task for layer in dual_lora_layers(model).values())
    begin_task(model, stats)
    with pytest.raises(ValueError, match=r"^layer 'channels.fc2': stats are for d=16"):
        end_task(model, wrong)
    assert all(layer._in_task and layer.tasks_done == 0 for layer in dual_lora_layers(model).values())
    end_task(model, stats)
    with pytest.raises(RuntimeError, match=r"^layer 'tokens.fc1': end_task\(\) without begin_task\(\)$"):
        end_task(model, stats)

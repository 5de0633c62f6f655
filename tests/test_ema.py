"""EMA: foreach update against the closed form, swap in/out, state round trips, safetensors files, wrapped models."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tinyflux.trainer.ema import EMA, clean_name


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.b.requires_grad_(False)  # frozen params are shadowed too
        self.register_buffer("scale", torch.ones(2))


class Wrapped(nn.Module):
    """Stands in for DDP / torch.compile naming: parameters appear under module._orig_mod."""

    def __init__(self, inner):
        super().__init__()
        self.module = nn.Module()
        self.module._orig_mod = inner


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def shift_weights(model, by):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_update_closed_form():
    model = make()
    w0 = model.a.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    shift_weights(model, 1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["a.weight"], w0 + 0.1)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["a.weight"], w0 + 1 - 0.9**2)
    assert ema.num_updates == 2


def test_bf16_model_updates_in_fp32():
    model = make().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    w0 = model.a.weight.float().clone()
    shift_weights(model, 1.0)
    ema.update(model)
    assert ema.shadow["a.weight"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["a.weight"], 0.5 * (w0 + model.a.weight.float()))


def test_warmup_decay_option():
    model = make()
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    w0 = model.a.weight.detach().clone()
    shift_weights(model, 1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["a.weight"], w0 + 0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert EMA(model, decay=0.999).current_decay() == 0.999


def test_apply_shadow_restore_and_copy_to():
    model = make()
    ema = EMA(model, decay=0.0)
    averaged = {n: t.clone() for n, t in ema.shadow.items()}
    shift_weights(model, 1.0)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.apply_shadow(model)
    torch.testing.assert_close(model.a.weight.detach(), averaged["a.weight"])
    with pytest.raises(RuntimeError, match="already applied"):
        ema.apply_shadow(model)
    ema.restore(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n])
    with pytest.raises(RuntimeError, match="apply_shadow"):
        ema.restore(model)
    ema.copy_to(model)
    torch.testing.assert_close(model.b.bias.detach(), averaged["b.bias"])


def test_state_dict_round_trip():
    model = make()
    ema = EMA(model, decay=0.8)
    shift_weights(model, 0.5)
    ema.update(model)
    ema.update(model)
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = EMA(make(seed=1), decay=0.1)
    other.load_state_dict(state)
    assert other.num_updates == 2 and other.decay == pytest.approx(0.8)
    for n in ema.shadow:
        torch.testing.assert_close(other.shadow[n], ema.shadow[n])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in state.items() if k != "shadow.a.bias"})


def test_save_and_load_file(tmp_path):
    model = make()
    ema = EMA(model, decay=0.7)
    shift_weights(model, 0.25)
    ema.update(model)
    path = tmp_path / "ema" / "ema.safetensors"
    ema.save(str(path))
    tensors = load_file(str(path))
    assert set(tensors) == set(model.state_dict())  # a plain model state dict, buffers included
    assert tensors["a.weight"].dtype == torch.bfloat16
    loaded = EMA.load(str(path), make(seed=3))
    assert loaded.num_updates == 1 and loaded.decay == pytest.approx(0.7)
    torch.testing.assert_close(loaded.shadow["a.weight"], ema.shadow["a.weight"].bfloat16().float())
    fresh = make(seed=4)
    fresh.load_state_dict({k: v.float() for k, v in tensors.items()})
    torch.testing.assert_close(fresh.a.weight, loaded.shadow["a.weight"])
    with pytest.raises(FileNotFoundError, match="not found"):
        EMA.load(str(tmp_path / "nope.safetensors"), model)


def test_wrapped_model_names_are_stripped(tmp_path):
    assert clean_name("module._orig_mod.a.weight") == "a.weight"
    inner = make()
    wrapped = Wrapped(inner)
    ema = EMA(wrapped, decay=0.0)
    assert set(ema.shadow) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    shift_weights(inner, 1.0)
    ema.update(wrapped)
    ema.save(str(tmp_path / "ema.safetensors"))
    bare = EMA.load(str(tmp_path / "ema.safetensors"), make(seed=5))
    torch.testing.assert_close(bare.shadow["a.weight"], inner.a.weight.detach().bfloat16().float())
    ema.apply_shadow(make(seed=6))  # an EMA of the wrapped model applies to a bare one


def test_mismatched_model_is_refused():
    ema = EMA(make())
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(3, 4))

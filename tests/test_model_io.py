"""Loading models: pickled files and package.module:factory with safetensors weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from core.errors import InputFileError, OptionsError
from core.examples import DigitsNet
from core.intake.model_io import load_model


def test_pickled_model_loads_in_eval_mode(digits_files, digits_model):
    model = load_model(str(digits_files[0]))
    assert isinstance(model, DigitsNet) and not model.training
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), digits_model(x))


def test_factory_with_weights_matches_the_trained_model(digits_model, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(digits_model.state_dict(), weights)
    model = load_model("core.examples:DigitsNet", str(weights))
    assert not model.training
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), digits_model(x))


def test_weights_of_another_shape(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(DigitsNet(width=16).state_dict(), weights)
    with pytest.raises(InputFileError, match="does not fit the model this factory builds: size mismatch"):
        load_model("core.examples:DigitsNet", str(weights))


def test_unexpected_weight_keys(digits_model, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file({**digits_model.state_dict(), "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(InputFileError, match="unexpected keys extra.weight"):
        load_model("core.examples:DigitsNet", str(weights))


def test_weights_file_not_safetensors(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(InputFileError, match="not a readable .safetensors file"):
        load_model("core.examples:DigitsNet", str(weights))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.models:build", "Cannot import no_such_package.models"),
        ("core.examples:no_such_factory", "has no callable no_such_factory"),
        ("core.examples:load_digits_arrays", "not a torch.nn.Module"),
    ],
)
def test_bad_factory(spec, message):
    with pytest.raises(InputFileError, match=message):
        load_model(spec)


def test_weights_with_a_pickled_model(digits_files, tmp_path):
    with pytest.raises(OptionsError, match="--weights is only used"):
        load_model(str(digits_files[0]), str(tmp_path / "w.safetensors"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; users still have such files
def test_torchscript_file_is_refused(digits_model, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(digits_model, torch.rand(1, 1, 8, 8)), path)
    with pytest.raises(InputFileError, match="TorchScript"):
        load_model(str(path))


def test_file_holding_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(InputFileError, match="it holds a list"):
        load_model(str(path))

"""The digits example: accurate on held-out data, reproducible, and usable from the CLI."""

from __future__ import annotations

import numpy as np
import torch

from core import cli
from core.examples import DigitsNet, fit_digits_net, load_digits_arrays


def test_digits_net_is_accurate_on_held_out_digits():
    x, y = load_digits_arrays()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)):]
    model = fit_digits_net(x[train], y[train], seed=0)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x[test])).argmax(1).numpy()
    assert (predicted == y[test]).mean() > 0.95


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    x, y = load_digits_arrays()
    state = torch.random.get_rng_state()
    first, second = (fit_digits_net(x[:256], y[:256], seed=3, epochs=1) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_example_command_writes_a_model_and_its_data(tmp_path, capsys):
    assert cli.main(["example", "digits", "--out", str(tmp_path)]) == 0
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    with np.load(tmp_path / "data.npz") as data:
        x, y = data["x"], data["y"]
    assert isinstance(model, DigitsNet)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert str(tmp_path / "model.pt") in capsys.readouterr().out

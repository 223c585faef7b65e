"""The optimizers of the engine: SGD (Dassl's) and AdamW (Tip-Adapter-F's), checked against hand-computed
updates, through the config's validation, and across an interrupted and resumed run."""

from __future__ import annotations

import pytest
import torch

from test_reliability_training import MarkedImages, coop, killed_at_step, params
from vlprompt.engine import OptimConfig, fit, load_checkpoint
from vlprompt.engine.config import build_config
from vlprompt.engine.optim import build_optimizer
from vlprompt.errors import ConfigError


def _one_step(optim: OptimConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(parameter before, its gradient, parameter after one step) of a quadratic loss."""
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    before = weight.detach().clone()
    optimizer = build_optimizer([weight], optim)
    (weight ** 2 * torch.tensor([1.0, 3.0, -2.0])).sum().backward()
    grad = weight.grad.detach().clone()
    optimizer.step()
    return before, grad, weight.detach().clone()


def test_adamw_first_step_matches_the_hand_computed_update():
    optim = OptimConfig(lr=0.1, optimizer="adamw", adam_eps=1e-4, weight_decay=0.01, warmup_epochs=0)
    before, grad, after = _one_step(optim)
    # First AdamW step: the bias-corrected moments are g and g^2, decay is decoupled (applied to the weight).
    expected = before * (1 - 0.1 * 0.01) - 0.1 * grad / (grad.abs() + 1e-4)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_sgd_first_step_is_plain_sgd_with_coupled_weight_decay():
    optim = OptimConfig(lr=0.1, weight_decay=0.01, warmup_epochs=0)
    before, grad, after = _one_step(optim)
    torch.testing.assert_close(after, before - 0.1 * (grad + 0.01 * before), rtol=0, atol=1e-6)


@pytest.mark.parametrize("override, message", [("optim.optimizer=adam", "optim.optimizer must be one of sgd, adamw"),
                                               ("optim.adam_eps=0", "optim.adam_eps must be > 0")])
def test_unknown_optimizer_or_bad_eps_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=[override])


def test_tip_adapter_f_presets_train_with_adamw_as_the_original():
    for protocol in ("few_shot", "base2new", "cross_dataset", "cross_domain"):
        config = build_config(method="tip_adapter_f", protocol=protocol, dataset="imagenet")
        assert (config.optim.optimizer, config.optim.adam_eps, config.optim.weight_decay) == ("adamw", 1e-4, 0.01)


def test_an_adamw_run_resumes_bit_identically(tiny_clip, tmp_path):
    optim = OptimConfig(lr=0.01, epochs=3, optimizer="adamw", adam_eps=1e-4, weight_decay=0.01)
    torch.manual_seed(0)
    reference = coop(tiny_clip)
    fit(reference, MarkedImages(), optim=optim, batch_size=4, seed=3, num_workers=0, progress=False)

    method = killed_at_step(coop(tiny_clip), 2 * 2 + 1)  # 2 steps per epoch: the first step of the third
    path = str(tmp_path / "ckpt.pt")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(method, MarkedImages(), optim=optim, batch_size=4, seed=3, num_workers=0, progress=False,
            checkpoint_path=path)
    assert load_checkpoint(path)["optimizer"]["state"], "the AdamW moments are in the checkpoint"
    resumed = coop(tiny_clip)
    fit(resumed, MarkedImages(), optim=optim, batch_size=4, seed=3, num_workers=0, progress=False,
        checkpoint_path=path)
    assert all(torch.equal(value, params(resumed)[name]) for name, value in params(reference).items())

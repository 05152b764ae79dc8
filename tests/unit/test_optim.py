"""Optimizer/scheduler specs: dict defaults and CLI callables build the same thing; errors are named."""

from __future__ import annotations

import functools

import pytest
import torch

from adx.models.components.optim import build, build_optimizers, spec


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def test_spec_and_callable_build_the_same_optimizer() -> None:
    from_spec = build(spec("torch.optim.Adam", lr=2e-4, weight_decay=1e-5), _params())
    from_callable = build(functools.partial(torch.optim.Adam, lr=2e-4, weight_decay=1e-5), _params())
    for opt in (from_spec, from_callable):
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 2e-4 and opt.defaults["weight_decay"] == 1e-5


def test_scheduler_and_frozen_parameters() -> None:
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    out = build_optimizers(
        [*_params(), frozen],
        spec("torch.optim.SGD", lr=0.1),
        spec("torch.optim.lr_scheduler.StepLR", step_size=2),
        "step",
    )
    assert isinstance(out["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert out["lr_scheduler"]["interval"] == "step"
    assert len(out["optimizer"].param_groups[0]["params"]) == 1  # the frozen one is left out
    assert isinstance(build_optimizers(_params(), spec("torch.optim.SGD", lr=0.1), None), torch.optim.SGD)


def test_errors_are_named() -> None:
    with pytest.raises(ValueError, match="torch.optim.Adamm"):
        build(spec("torch.optim.Adamm", lr=1.0), _params())
    with pytest.raises(ValueError, match="class_path"):
        build({"init_args": {"lr": 1.0}}, _params())
    with pytest.raises(TypeError, match="callable"):
        build(3, _params())
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        build_optimizers([frozen], spec("torch.optim.SGD", lr=0.1), None)

"""Stages and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.optim import CosineSchedule, create_optimizer, lr_factor, param_groups, stage_of, training_stages


def test_single_stage_with_scaleup_continues_the_cosine():
    stages = training_stages({"epochs": 5, "scaleup_epochs": 1, "scaleup_templates": "M2", "lr": 1e-3})
    assert [(s.start, s.epochs) for s in stages] == [(0, 4), (4, 1)]
    assert stages[1].params["size_templates"] == "M2" and stages[1].params["freeze_bn"]
    assert all(s.chain_start == 0 and s.chain_epochs == 5 for s in stages)
    assert stage_of(stages, 4).index == 1
    with pytest.raises(ValueError, match="past the last stage"):
        stage_of(stages, 5)


def test_stage_with_its_own_lr_starts_a_new_cosine():
    stages = training_stages({"lr": 1e-3, "stages": [{"epochs": 2, "freeze_backbone": True, "lr": 1e-2},
                                                     {"epochs": 3, "lr": 1e-4}, {"epochs": 1}]})
    assert [(s.chain_start, s.chain_epochs) for s in stages] == [(0, 2), (2, 4), (2, 4)]
    assert stages[2].params["lr"] == 1e-4  # continues the second stage's rate, not the params' 1e-3
    with pytest.raises(ValueError, match=r"stages\[0\]: unknown keys \['lr_head'\]"):
        training_stages({"stages": [{"epochs": 1, "lr_head": 1}]})
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        training_stages({"stages": [{"epochs": 0}]})


def test_lr_factor_is_landmark2019_cosine():
    min_ratio = 3e-6 / 1e-3
    assert lr_factor(0.0, 0.0, min_ratio) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.0, min_ratio) == pytest.approx(min_ratio)
    assert lr_factor(0.5, 0.0, min_ratio) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert lr_factor(0.3, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_factor(0.05, 0.1, 0.0) == pytest.approx(0.5)  # linear warm-up
    assert lr_factor(0.1, 0.1, 0.0) == pytest.approx(1.0)


def test_param_groups_and_schedule():
    net = torch.nn.Module()
    net.backbone = torch.nn.Linear(3, 3)
    net.head = torch.nn.Linear(3, 2)
    net.backbone.bias.requires_grad_(False)
    groups = param_groups(net, {"lr": 0.1, "backbone_lr": 0.01, "wd": 1e-4})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head", "head-no_decay", "backbone"}
    assert by_name["backbone"]["lr"] == 0.01 and by_name["head-no_decay"]["weight_decay"] == 0.0
    assert groups[0]["name"] == "head"
    opt = create_optimizer(net, {"lr": 0.1, "backbone_lr": 0.01, "optimizer": "sgd"})
    sched = CosineSchedule(opt, training_stages({"epochs": 2, "lr": 0.1, "min_lr": 0.0})[0])
    assert sched.step(1, 0.0) == pytest.approx(0.05)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(net, {"optimizer": "lbfgs"})
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        param_groups(net, {})

"""evaluate()'s held-out numbers against an independent computation: one F.cross_entropy over the whole held-out
set (mean over images), and top-1/top-5 counted by hand, on the digits with ragged batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ganet.train.config import TrainConfig
from ganet.train.data import load_digits
from ganet.train.engine import Runtime, evaluate, make_batches


def test_evaluate_matches_one_cross_entropy_over_the_held_out_set():
    eval_batch_size = 100  # several batches and a ragged last one
    torch.manual_seed(0)
    data = load_digits(8)
    rt = Runtime(torch.device("cpu"))
    # A small CNN (evaluate's sums are under test, not the network), its logits spread far from chance values.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(30)
    batches = make_batches(data, data.preprocessing, rt, TrainConfig(), train=False, eval_batch_size=eval_batch_size)
    loss, top1, top5, n = evaluate(model, batches, rt)

    x = torch.cat([xb for xb, _, _ in batches.batches(0)])  # the same held-out images, all at once
    y = data.val.targets
    assert n == len(y) == len(x) > eval_batch_size and n % eval_batch_size != 0
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y, reduction="mean").item(), rel=1e-5)
    assert loss > 0.5  # an untrained model: a loss that a mean-of-means bug would shrink is far from 0
    assert top1 == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-12)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scored above the true one
    assert top5 == pytest.approx((ranks < 5).double().mean().item(), abs=1e-12)
    assert 0 < top1 < top5 < 1

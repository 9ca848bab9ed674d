"""Lambda and learning-rate schedules at their key steps."""

import itertools
import math

import pytest
from llgbm_train.schedules import ScheduleError, lambda_at, lr_lambda


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("constant", 0, 2.0),
        ("constant", 5, 2.0),
        ("linear", 0, 0.5),
        ("linear", 5, 0.5 + 1.5 * 0.5),
        ("linear", 10, 2.0),
        ("linear", 1000, 2.0),
        ("cosine", 0, 0.5),
        ("cosine", 5, 0.5 + 1.5 * 0.5),
        ("cosine", 2, 0.5 + 1.5 * (1 - math.cos(math.pi * 0.2)) / 2),
        ("cosine", 10, 2.0),
    ],
)
def test_lambda_at_key_steps(kind, step, expected):
    got = lambda_at(step, kind=kind, value=2.0, warmup_steps=10, start=0.5)
    assert got == pytest.approx(expected)


def test_lambda_cosine_is_slower_than_linear_early_and_monotone():
    lin = [lambda_at(s, kind="linear", value=1.0, warmup_steps=20) for s in range(25)]
    cos = [lambda_at(s, kind="cosine", value=1.0, warmup_steps=20) for s in range(25)]
    assert cos[2] < lin[2] and cos[18] > lin[18]
    assert all(a <= b for a, b in itertools.pairwise(cos))


def test_lambda_without_warmup_is_the_value():
    assert lambda_at(0, kind="linear", value=0.3, warmup_steps=0) == 0.3
    assert lambda_at(0, kind="cosine", value=0.3, warmup_steps=0) == 0.3


def test_lr_lambda_key_steps():
    kw = {"warmup_steps": 10, "total_steps": 110, "min_ratio": 0.1}
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(10, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, **kw) == pytest.approx(0.1)
    assert lr_lambda(500, **kw) == pytest.approx(0.1)
    decay = [lr_lambda(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_lr_lambda_no_warmup_starts_at_one():
    assert lr_lambda(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
    assert lr_lambda(10, warmup_steps=0, total_steps=10) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: lambda_at(0, kind="exp", value=1, warmup_steps=1), "kind"),
        (lambda: lambda_at(-1, kind="linear", value=1, warmup_steps=1), "step"),
        (lambda: lr_lambda(0, warmup_steps=5, total_steps=0), "total_steps"),
        (lambda: lr_lambda(0, warmup_steps=20, total_steps=10), "warmup_steps"),
        (lambda: lr_lambda(0, warmup_steps=1, total_steps=10, min_ratio=2.0), "min_ratio"),
    ],
)
def test_schedule_bad_arguments(call, match):
    with pytest.raises(ScheduleError, match=match):
        call()

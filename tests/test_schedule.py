"""schedule.warmup_cosine against the two schedules written out by hand: cpc-train's (warm-up, then cosine to
lr * min_lr_ratio) and the evaluation classifiers' (one cosine over the run, capped by the warm-up ramp)."""
import math

import pytest

from cpc_models.schedule import warmup_cosine


def _pretraining(step, total, warmup, lr, min_ratio):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _classifier(step, total, warmup):
    return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


@pytest.mark.parametrize('total, warmup, lr, min_ratio', [(100, 10, 2e-3, 0.01), (800, 100, 0.1, 0.0), (7, 0, 1.0, 0.5),
                                                          (5, 9, 4e-4, 0.01)])
def test_pretraining_schedule(total, warmup, lr, min_ratio):
    for step in range(total + 5):
        assert warmup_cosine(step, total, warmup, lr, min_ratio) == _pretraining(step, total, warmup, lr, min_ratio)
    if warmup and warmup < total:
        assert warmup_cosine(warmup - 1, total, warmup, lr, min_ratio) == lr  # the peak, then the decay
        assert warmup_cosine(total, total, warmup, lr, min_ratio) == pytest.approx(lr * min_ratio)


@pytest.mark.parametrize('total, warmup', [(150, 8), (3, 1), (300, 15)])
def test_classifier_schedule(total, warmup):
    for step in range(total):
        assert warmup_cosine(step, total, warmup, decay_during_warmup=True) == _classifier(step, total, warmup)

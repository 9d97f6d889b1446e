"""The learning-rate schedule of every training loop here: linear warm-up, then cosine decay (per step).

``cpc-train`` warms up over ``warmup_steps`` and then decays over the remaining steps to ``base * min_ratio``
(nanoGPT's ``get_lr``). The evaluation classifiers and the fine-tuning example run one cosine over the whole run,
capped by the warm-up ramp (``decay_during_warmup=True``), as ``torch.optim.lr_scheduler.LambdaLR`` factors
(``base=1``).
"""
import math

__all__ = ['warmup_cosine']


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float = 1.0, min_ratio: float = 0.0,
                  decay_during_warmup: bool = False) -> float:
    """Learning rate of step ``step`` (0-based).

    Args:
        step: optimizer steps done before this one.
        total_steps: length of the run; past it the rate stays at ``base * min_ratio``.
        warmup_steps: steps of the linear ramp ``base * (step + 1) / warmup_steps``.
        base: the peak rate.
        min_ratio: where the cosine ends, as a fraction of ``base``.
        decay_during_warmup: False: the cosine starts after the warm-up; True: it spans the whole run and the
            rate is the smaller of ramp and cosine.
    """
    start = 0 if decay_during_warmup else warmup_steps
    t = max(step - start, 0) / max(1, total_steps - start)
    cosine = base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    if step >= warmup_steps and not decay_during_warmup:
        return cosine
    ramp = base * (step + 1) / warmup_steps
    return min(ramp, cosine) if decay_during_warmup else ramp

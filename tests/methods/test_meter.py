"""TrainingMeter: the interval figures it reads once per flush, against plain Python counts."""

import math
import random

import pytest
import torch

from lmdistill.methods.meter import TrainingMeter


def _steps(n: int, seed: int) -> list[tuple[float, bool, dict]]:
    """(loss, skipped, terms) per step; skipped steps in runs of 1-4, some with NaN losses."""
    rng = random.Random(seed)
    steps, i = [], 0
    while i < n:
        if rng.random() < 0.2:
            for _ in range(rng.randint(1, 4)):
                steps.append((math.nan if rng.random() < 0.5 else rng.uniform(0, 3), True,
                              {"qq": rng.uniform(0, 1), "kk": math.inf}))  # fmt: skip
                i += 1
        else:
            steps.append((rng.uniform(0, 3), False, {"qq": rng.uniform(0, 1),
                                                      "kk": rng.uniform(0, 1)}))  # fmt: skip
            i += 1
    return steps[:n]


def _reference(steps, cuts, tokens_per_step, world=1):
    """Per interval: tokens, mean loss and terms over kept steps, skipped, longest skip run."""
    out, run, start = [], 0, 0
    for cut in cuts:
        part = steps[start:cut]
        kept = [s for s in part if not s[1]]
        worst = run
        for _, skipped, _ in part:
            run = run + 1 if skipped else 0
            worst = max(worst, run)
        mean = (lambda xs: sum(xs) / len(xs)) if kept else (lambda xs: None)
        out.append({
            "tokens": tokens_per_step * len(part) * world,
            "loss": mean([s[0] for s in kept]),
            "terms": {k: mean([s[2][k] for s in kept]) for k in ("qq", "kk")},
            "nonfinite": world * (len(part) - len(kept)),
            "worst_run": worst,
        })  # fmt: skip
        start = cut
    return out


def _close(got, expected) -> bool:
    return got is None if expected is None else got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_interval_figures_match_plain_counts(world):
    steps, cuts = _steps(60, seed=world), [7, 8, 30, 31, 60]
    meter = TrainingMeter()
    reduce = (lambda t: t * world) if world > 1 else None  # `world` identical ranks, summed
    got, start = [], 0
    for cut in cuts:
        for loss, skipped, terms in steps[start:cut]:
            meter.add_batch_tokens(100)
            meter.add_step(torch.tensor(loss), torch.tensor(skipped),
                           {k: torch.tensor(v) for k, v in terms.items()})  # fmt: skip
        assert meter.pending
        got.append(meter.flush(reduce))
        assert not meter.pending
        start = cut
    for g, r in zip(got, _reference(steps, cuts, 100, world), strict=True):
        assert {k: g[k] for k in ("tokens", "nonfinite", "worst_run")} == {
            k: r[k] for k in ("tokens", "nonfinite", "worst_run")
        }
        assert _close(g["loss"], r["loss"])
        assert all(_close(g["terms"][k], r["terms"][k]) for k in ("qq", "kk"))
    assert meter.tokens_seen == 100 * 60 * world
    assert meter.nonfinite_steps == world * sum(s[1] for s in steps)
    assert meter.loss_first == pytest.approx(steps[0][0], rel=1e-6, nan_ok=True)  # even if skipped
    last = [s[0] for s in steps[-10:] if not s[1]]
    assert meter.final_loss == pytest.approx(sum(last) / len(last), rel=1e-6)


def test_final_loss_counts_steps_not_flushed_yet():
    meter = TrainingMeter()
    losses = [1.0, 2.0, 3.0, 4.0]
    for i, loss in enumerate(losses):
        meter.add_step(torch.tensor(loss), torch.tensor(i == 1), {})
        if i == 1:
            meter.flush()
    assert meter.final_loss == pytest.approx((1.0 + 3.0 + 4.0) / 3)
    assert meter.loss_first == 1.0


def test_a_skip_run_goes_on_across_flushes():
    meter = TrainingMeter()
    flags = [False, True, True, True, True, True, False]
    worst = []
    for i, flag in enumerate(flags):
        meter.add_step(torch.tensor(1.0), torch.tensor(flag), {})
        if i in (2, 4, 6):
            worst.append(meter.flush()["worst_run"])
    assert worst == [2, 4, 5]


def test_changed_loss_terms_inside_an_interval_are_refused():
    meter = TrainingMeter()
    meter.add_step(torch.tensor(1.0), torch.tensor(False), {"qq": torch.tensor(0.1)})
    with pytest.raises(ValueError, match=r"loss terms changed from \['qq'\] to \['kk'\]"):
        meter.add_step(torch.tensor(1.0), torch.tensor(False), {"kk": torch.tensor(0.1)})


def test_no_steps_no_figures():
    assert TrainingMeter().flush() == {}
    assert TrainingMeter().final_loss is None


def test_checkpoint_state_counts_pending_steps_and_leaves_them_to_the_flush():
    meter = TrainingMeter()
    for loss, skipped in [(2.0, True), (1.0, False), (3.0, False)]:
        meter.add_batch_tokens(10)
        meter.add_step(torch.tensor(loss), torch.tensor(skipped), {})
    state = meter.state_dict(reduce=lambda t: 2 * t)  # two identical ranks
    recent = state.pop("recent_losses")  # this rank's, for final_loss: NaN where skipped
    assert state == {"tokens_seen": 60, "loss_first": 2.0, "nonfinite_steps": 2, "skip_run": 0,
                     "unlogged": {"loss_sum": 8.0, "loss_count": 4, "nonfinite": 2, "terms": {},
                                  "worst_run": 1}}  # fmt: skip
    assert math.isnan(recent[0]) and recent[1:] == [1.0, 3.0]
    assert meter.pending and meter.tokens_seen == 0  # nothing consumed
    assert meter.flush()["loss"] == pytest.approx(2.0)  # the interval is still whole
    state = meter.state_dict()
    assert state.pop("recent_losses")[1:] == [1.0, 3.0]
    assert state == {"tokens_seen": 30, "loss_first": 2.0, "nonfinite_steps": 1, "skip_run": 0,
                     "unlogged": None}  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
def test_an_interval_cut_by_a_checkpoint_is_logged_whole_after_the_resume(world):
    """Steps taken after the last flush and before a checkpoint go into the resumed run's first
    flush: its figures are those of the interval that was never cut (and of plain counts)."""
    steps, cuts, saved_at = _steps(40, seed=3 + world), [9, 23, 40], [5, 12, 13, 30]
    reduce = (lambda t: t * world) if world > 1 else None
    meter, got, start = TrainingMeter(), [], 0
    for cut in cuts:
        for i in range(start, cut):
            if i in saved_at:  # the checkpoint's state, loaded by a new process
                state = meter.state_dict(reduce)
                meter = TrainingMeter()
                meter.load_state_dict(state)
            loss, skipped, terms = steps[i]
            meter.add_batch_tokens(100)
            meter.add_step(torch.tensor(loss), torch.tensor(skipped),
                           {k: torch.tensor(v) for k, v in terms.items()})  # fmt: skip
        got.append(meter.flush(reduce))
        start = cut
    for g, r in zip(got, _reference(steps, cuts, 100, world), strict=True):
        assert (g["nonfinite"], g["worst_run"]) == (r["nonfinite"], r["worst_run"])
        assert _close(g["loss"], r["loss"])
        assert all(_close(g["terms"][k], r["terms"][k]) for k in ("qq", "kk"))
    assert meter.tokens_seen == 100 * 40 * world
    assert meter.nonfinite_steps == world * sum(s[1] for s in steps)


def test_final_loss_resumes_with_the_last_ten_steps():
    """A resumed meter's final_loss counts the steps before the checkpoint (at most 10)."""
    meter = TrainingMeter()
    losses = [float(i) for i in range(12)]
    for loss in losses[:8]:
        meter.add_step(torch.tensor(loss), torch.tensor(False), {})
    meter.flush()
    meter.add_step(torch.tensor(losses[8]), torch.tensor(False), {})  # pending at the save
    resumed = TrainingMeter()
    resumed.load_state_dict(meter.state_dict())
    for loss in losses[9:]:
        resumed.add_step(torch.tensor(loss), torch.tensor(False), {})
    assert resumed.final_loss == pytest.approx(sum(losses[2:]) / 10)

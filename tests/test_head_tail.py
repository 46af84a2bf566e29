"""experiments/head_tail.py: the measured outcomes stay what they were (2026-12-01).

The assertions state what the experiment measured on the Zipf teacher, including where it
disagrees with the paper (RKL closed the tail gap faster than FKL only with SGD from random
logits), each with a margin well inside the measured difference, so that a regression in the
losses or the statistics shows.
"""

import dataclasses

import pytest

from experiments import head_tail

SETTINGS = {(s.optimizer, s.init): s for s in head_tail.SETTINGS}


@pytest.fixture(scope="module")
def teacher():
    return head_tail.zipf_teacher()


def early_verdicts(teacher, setting):
    short = dataclasses.replace(setting, steps=setting.early)  # the early phase alone
    trajectories = {loss: head_tail.fit(teacher, loss, short) for loss in head_tail.PAPER_LOSSES}
    return head_tail.verdicts(trajectories, short)


@pytest.mark.parametrize("key", list(SETTINGS))
def test_fkl_closes_the_head_gap_faster_early(teacher, key):
    head = early_verdicts(teacher, SETTINGS[key])["head_gap_at_early"]
    assert head["rkl"] - head["fkl"] > 0.003  # measured: 0.0065 (Adam, random) to 0.49 (SGD, random)


@pytest.mark.parametrize(
    "key,rkl_faster",
    [(("sgd", "uniform"), False), (("sgd", "random"), True), (("adam", "uniform"), False), (("adam", "random"), False)],
)
def test_which_loss_closes_the_tail_gap_faster_early(teacher, key, rkl_faster):
    tail = early_verdicts(teacher, SETTINGS[key])["tail_gap_at_early"]
    # measured fkl - rkl: -0.30, +0.085, -0.087, -0.12 (SGD uniform, SGD random, Adam uniform, Adam random)
    difference = tail["fkl"] - tail["rkl"]
    assert difference > 0.03 if rkl_faster else difference < -0.03


@pytest.mark.parametrize("init", ["uniform", "random"])
def test_with_adam_fkl_rkl_and_akl_all_reach_the_teacher(teacher, init):
    setting = SETTINGS[("adam", init)]
    final = {loss: head_tail.fit(teacher, loss, setting)["kl"][-1] for loss in head_tail.PAPER_LOSSES}
    assert all(kl < head_tail.CONVERGED_KL for kl in final.values()), final  # measured: at most 2.5e-6

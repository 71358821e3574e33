"""CDPO's multiplier update and advantage combination on hand-built numbers."""

import torch

from rewardtune.lagrangian import DualState, combine_advantages, dual_scale


def test_multiplier_rises_under_violation_stays_nonnegative_and_falls_when_satisfied():
    dual = DualState(integral=[0.0])
    assert dual.update([1.0], [0.5], lr=0.2) == [0.1]  # violated by 0.5: +0.2*0.5
    assert dual.update([1.0], [0.5], lr=0.2)[0] > 0.1  # still violated: rises
    falling = dual.update([1.0], [1.4], lr=0.2)[0]  # satisfied with slack 0.4: falls by 0.08
    assert abs(falling - (0.2 - 0.08)) < 1e-12
    assert dual.update([1.0], [5.0], lr=0.2) == [0.0]  # projected at 0, never negative


def test_pid_terms_damp_the_multiplier():
    plain, pid = DualState(integral=[0.0]), DualState(integral=[0.0])
    plain.update([1.0], [0.0], lr=0.1)
    pid.update([1.0], [0.0], lr=0.1, kp=0.5, kd=0.2)
    assert plain.multipliers == [0.1] and abs(pid.multipliers[0] - (0.1 + 0.5 + 0.2)) < 1e-12


def test_combined_advantage_by_hand():
    main, aux = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 3.0])
    torch.testing.assert_close(combine_advantages(main, [aux], [0.0]), main)
    torch.testing.assert_close(combine_advantages(main, [aux], [1.0]), torch.tensor([0.0, 1.0]))


def test_state_round_trip():
    dual = DualState(integral=[0.3, 0.0])
    dual.update([1.0, 0.0], [0.0, 1.0], lr=0.1)
    again = DualState(**dual.state_dict())
    assert again.multipliers == dual.multipliers and again.previous_error == dual.previous_error


def test_scale_free_step_divides_the_violation_by_the_base_std():
    # violation 0.5 on a reward whose base std is 0.25: e = 2 standard deviations, λ = 0.1 * 2 = 0.2
    dual = DualState(integral=[0.0], scales=[0.25])
    assert abs(dual.update([1.0], [0.5], lr=0.1)[0] - 0.2) < 1e-12
    # the same violation in units 100x larger, with a 100x larger std, moves λ by exactly as much
    scaled = DualState(integral=[0.0], scales=[25.0])
    assert abs(scaled.update([100.0], [50.0], lr=0.1)[0] - 0.2) < 1e-12
    assert DualState(**scaled.state_dict()).scales == [25.0]


def test_dual_scale_floors_a_constant_reward():
    assert dual_scale(0.3, 1e-3) == 0.3
    assert dual_scale(0.0, 1e-3) == 1e-3

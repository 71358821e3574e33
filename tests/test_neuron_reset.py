"""Neuron scores, dormant/active masks and resets on hand-built layers."""

import math

import torch
from torch import nn

from rewardtune.critic import ValueCritic
from rewardtune.neuron_reset import (
    dormant_mask,
    dormant_overlap,
    neuron_scores,
    record_activations,
    reset_linear_neurons,
    reset_lora_neurons,
    select_neurons,
)


def test_scores_normalize_by_layer_mean_and_dead_neuron_is_dormant():
    # neuron 0 always negative (ReLU -> 0: dead), neuron 1 mean |a| = 1, neuron 2 mean |a| = 2
    acts = torch.tensor([[-1.0, 1.0, 2.0], [-3.0, 1.0, 2.0]])
    scores = neuron_scores(acts)
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0, 2.0]) / (1.0 + 1e-9))
    assert dormant_mask(scores, 0.0).tolist() == [True, False, False]
    assert select_neurons(scores, "active", tau=0.0).tolist() == [False, True, True]
    assert select_neurons(scores, "overactive", tau_high=1.5).tolist() == [False, False, True]
    assert select_neurons(scores, "top_fraction", fraction=0.3).tolist() == [False, False, True]


def test_dormant_overlap_is_jaccard():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert dormant_overlap(a, b) == 1 / 3
    assert math.isnan(dormant_overlap(None, b))


def test_record_activations_hooks_layers():
    critic = ValueCritic(4, [3, 2], [0.0, 0.0])
    x = torch.randn(5, 4)
    first, second = critic.linears()[:2]
    acts = record_activations([first, second], lambda: critic(x))
    torch.testing.assert_close(acts[0], first(x))
    torch.testing.assert_close(acts[1], second(first(x)))


def test_reset_changes_exactly_the_masked_rows_columns_and_adam_moments():
    torch.manual_seed(0)
    critic = ValueCritic(4, [3, 2], [0.0, 0.0])
    optimizer = torch.optim.AdamW(critic.parameters(), lr=0.1)
    critic(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    layer, nxt = critic.linears()[:2]
    layer.bias.data.fill_(0.5)
    before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in critic.parameters()}
    mask = torch.tensor([False, True, False])
    reset_linear_neurons(layer, nxt, mask, optimizer, torch.Generator().manual_seed(1), critic.init_std)

    assert torch.equal(layer.weight[[0, 2]], before["layers.0.weight"][[0, 2]])
    assert not torch.equal(layer.weight[1], before["layers.0.weight"][1])
    assert layer.bias.tolist() == [0.5, 0.0, 0.5]
    assert torch.equal(nxt.weight[:, [0, 2]], before["layers.1.weight"][:, [0, 2]])
    assert not torch.equal(nxt.weight[:, 1], before["layers.1.weight"][:, 1])
    for key in ("exp_avg", "exp_avg_sq"):
        state_w, old_w = optimizer.state[layer.weight][key], moments[id(layer.weight)][key]
        assert torch.all(state_w[1] == 0) and torch.equal(state_w[[0, 2]], old_w[[0, 2]])
        state_n, old_n = optimizer.state[nxt.weight][key], moments[id(nxt.weight)][key]
        assert torch.all(state_n[:, 1] == 0) and torch.equal(state_n[:, [0, 2]], old_n[:, [0, 2]])
        assert optimizer.state[layer.bias][key][1] == 0
    # the untouched later layers keep their weights
    assert torch.equal(critic.linears()[2].weight, before["layers.2.weight"])


def test_reset_draws_from_the_init_distribution_deterministically():
    a, b = nn.Linear(400, 300), nn.Linear(300, 2)
    mask = torch.ones(300, dtype=torch.bool)
    reset_linear_neurons(a, b, mask, None, torch.Generator().manual_seed(3), 1 / 401)
    assert abs(a.weight.std().item() - 1 / 401) < 2e-4 and a.bias.abs().sum() == 0
    c, d = nn.Linear(400, 300), nn.Linear(300, 2)
    reset_linear_neurons(c, d, mask, None, torch.Generator().manual_seed(3), 1 / 401)
    assert torch.equal(a.weight, c.weight) and torch.equal(b.weight, d.weight)


def test_critic_init_uses_std_one_over_input_size_plus_one_for_every_layer():
    # official critic_model.MLP: every Linear weight ~ N(0, 1/(d+1)), d = the critic's input size; biases 0
    d = 768
    critic = ValueCritic(d, [1024, 128, 64, 16], [0.2, 0.2, 0.1, 0.0], torch.Generator().manual_seed(5))
    assert critic.init_std == 1 / 769
    expected = torch.Generator().manual_seed(5)  # the same draws, in layer order, by hand
    for layer in critic.linears():
        torch.testing.assert_close(layer.weight, torch.randn(layer.weight.shape, generator=expected) * (1 / 769), rtol=0, atol=0)
        assert layer.bias.abs().sum() == 0
    # and the statistics on the big layers (not each layer's fan-in: 1/1025 for the 1024->128 layer would be ~25% off)
    first, second = critic.linears()[:2]
    assert abs(first.weight.std().item() * 769 - 1) < 0.01
    assert abs(second.weight.std().item() * 769 - 1) < 0.02


def test_reset_of_a_later_layer_redraws_in_and_out_weights_at_the_critic_input_std():
    d = 1024  # ViT-H-14 critic: 1/1025 everywhere (the official PickScore re-draw at 1/769 is not copied)
    critic = ValueCritic(d, [1024, 128, 64, 16], [0.0] * 4)
    layer, nxt = critic.linears()[2], critic.linears()[3]  # 128 -> 64 and 64 -> 16
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::2] = True
    reset_linear_neurons(layer, nxt, mask, None, torch.Generator().manual_seed(9), critic.init_std)
    g = torch.Generator().manual_seed(9)
    torch.testing.assert_close(layer.weight[mask], torch.randn(32, 128, generator=g) * (1 / 1025), rtol=0, atol=0)
    torch.testing.assert_close(nxt.weight[:, mask], torch.randn(16, 32, generator=g) * (1 / 1025), rtol=0, atol=0)
    assert layer.bias[mask].abs().sum() == 0


def test_lora_reset_redraws_down_rows_and_zeroes_up_columns():
    down, up = nn.Linear(6, 4, bias=False), nn.Linear(4, 5, bias=False)
    nn.init.ones_(up.weight)
    old_down = down.weight.detach().clone()
    reset_lora_neurons(down, up, torch.tensor([True, False, False, True]), None, torch.Generator().manual_seed(0))
    assert torch.equal(down.weight[[1, 2]], old_down[[1, 2]]) and not torch.equal(down.weight[0], old_down[0])
    assert torch.all(up.weight[:, [0, 3]] == 0) and torch.all(up.weight[:, [1, 2]] == 1)

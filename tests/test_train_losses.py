"""Bradley–Terry, tie, margin, weight and centering terms of the pairwise loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from factory.trainer.losses import pair_losses, preference_loss


def test_tie_loss_pulls_tie_pairs_together_while_bt_pairs_separate():
    torch.manual_seed(0)
    # Free rewards for 6 items: pairs (0,1), (2,3) are preferences, (4,5) is a tie.
    rewards = torch.nn.Parameter(torch.tensor([0.0, 0.5, -1.0, 0.3, 2.0, -1.5]))
    chosen, rejected = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    tie = torch.tensor([False, False, True])
    opt = torch.optim.SGD([rewards], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        preference_loss(rewards[chosen], rewards[rejected], tie=tie).loss.backward()
        opt.step()
    diff = (rewards[chosen] - rewards[rejected]).detach()
    assert abs(diff[2]) < 0.05  # started at 3.5 apart
    assert diff[0] > 2.0 and diff[1] > 2.0  # started the wrong way round


def test_tie_loss_is_bce_against_one_half():
    d = torch.tensor([0.0, 1.3, -2.0])
    per_pair = pair_losses(d, torch.zeros(3), tie=torch.ones(3, dtype=torch.bool))
    expected = F.binary_cross_entropy(torch.sigmoid(d), torch.full((3,), 0.5), reduction="none")
    assert torch.allclose(per_pair, expected, atol=1e-6)
    assert math.isclose(float(per_pair[0]), math.log(2), rel_tol=1e-6)


def test_zero_weight_pair_has_no_influence_on_loss_or_gradients():
    torch.manual_seed(1)
    x_c, x_r = torch.randn(5, 8), torch.randn(5, 8)

    def grads(rows: list[int], weights: list[float]) -> tuple[float, torch.Tensor]:
        torch.manual_seed(2)
        lin = torch.nn.Linear(8, 1)
        parts = preference_loss(lin(x_c[rows]).squeeze(-1), lin(x_r[rows]).squeeze(-1),
                                weight=torch.tensor(weights), tie=torch.tensor([False] * len(rows)))
        parts.loss.backward()
        return float(parts.loss.detach()), torch.cat([p.grad.flatten() for p in lin.parameters()])

    loss_with, g_with = grads([0, 1, 2, 3, 4], [1.0, 2.0, 0.0, 0.5, 1.0])
    loss_without, g_without = grads([0, 1, 3, 4], [1.0, 2.0, 0.5, 1.0])
    assert math.isclose(loss_with, loss_without, rel_tol=1e-6)
    assert torch.allclose(g_with, g_without, atol=1e-7)
    # ...whereas a positive weight on that pair does change them
    _, g_weighted = grads([0, 1, 2, 3, 4], [1.0, 2.0, 1.0, 0.5, 1.0])
    assert not torch.allclose(g_with, g_weighted, atol=1e-4)


def test_all_zero_weights_give_zero_loss_not_nan():
    parts = preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), weight=torch.tensor([0.0]))
    assert float(parts.loss) == 0.0


def test_margin_shifts_the_bt_loss():
    r_c, r_r = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    no_margin = pair_losses(r_c, r_r)
    with_margin = pair_losses(r_c, r_r, margin=torch.tensor([0.0, 2.0]))
    assert torch.allclose(with_margin[0], no_margin[0])
    assert math.isclose(float(with_margin[1]), -math.log(1 / (1 + math.exp(1.0))), rel_tol=1e-6)
    assert with_margin[1] > no_margin[1]
    # the margin moves the optimum: the loss is the plain loss at d - margin
    assert torch.allclose(pair_losses(torch.tensor([3.0]), torch.tensor([0.0]), margin=torch.tensor([2.0])),
                          no_margin[:1])


def test_margin_is_ignored_on_tie_pairs():
    tie = torch.tensor([True])
    a = pair_losses(torch.tensor([0.3]), torch.tensor([0.0]), tie=tie, margin=torch.tensor([5.0]))
    b = pair_losses(torch.tensor([0.3]), torch.tensor([0.0]), tie=tie)
    assert torch.allclose(a, b)


def test_reward_centering_adds_the_squared_sum():
    r_c, r_r = torch.tensor([2.0]), torch.tensor([1.0])
    plain = pair_losses(r_c, r_r)
    centred = pair_losses(r_c, r_r, center_coef=0.01)
    assert math.isclose(float(centred - plain), 0.01 * 9.0, rel_tol=1e-6)


def test_weights_are_relative_to_the_dataset_mean_not_to_the_batch():
    r_c, r_r = torch.tensor([0.2, -0.1]), torch.tensor([0.0, 0.3])
    plain = preference_loss(r_c, r_r).loss
    low = torch.tensor([0.1, 0.1])
    # a batch of pairs weighing a tenth of the dataset's mean takes a tenth of the step...
    scaled = preference_loss(r_c, r_r, weight=low, mean_weight=1.0).loss
    assert math.isclose(float(scaled), 0.1 * float(plain), rel_tol=1e-6)
    # ...whereas normalised by its own weights it would take the full one
    assert math.isclose(float(preference_loss(r_c, r_r, weight=low).loss), float(plain), rel_tol=1e-6)
    # unit weights (mean 1) give the plain mean either way
    assert math.isclose(float(preference_loss(r_c, r_r, weight=torch.ones(2), mean_weight=1.0).loss),
                        float(plain), rel_tol=1e-6)

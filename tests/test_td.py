import pytest
import torch

from models.value.td import lambda_returns, masked_mse


def test_lambda_returns_by_hand():
    # u = [0.2, 0.5, 0.9] on three actions, R = 1, lambda = 0.5, gamma = 1:
    # y3 = 1; y2 = 0.5*0.9 + 0.5*1 = 0.95; y1 = 0.5*0.5 + 0.5*0.95 = 0.725
    values = torch.tensor([[0.0, 0.2, 0.5, 0.9, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    targets = lambda_returns(values, torch.tensor([1.0]), mask, lam=0.5, gamma=1.0)
    torch.testing.assert_close(targets, torch.tensor([[0.0, 0.725, 0.95, 1.0, 0.0]]))


def test_lambda_returns_with_discount_by_hand():
    # gamma = 0.9, lambda = 0.5, u = [0.4, -0.2], R = -1:
    # y2 = -1; y1 = 0.9 * (0.5 * -0.2 + 0.5 * -1) = -0.54
    targets = lambda_returns(torch.tensor([[0.4, -0.2]]), torch.tensor([-1.0]), torch.tensor([[1, 1]]),
                             lam=0.5, gamma=0.9)
    torch.testing.assert_close(targets, torch.tensor([[-0.54, -1.0]]))


def test_lambda_one_is_monte_carlo_and_zero_is_td0():
    values = torch.tensor([[0.3, 0.1, 0.7, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.long)
    mc = lambda_returns(values, torch.tensor([0.6]), mask, lam=1.0)
    torch.testing.assert_close(mc, torch.full((1, 4), 0.6))
    td0 = lambda_returns(values, torch.tensor([0.6]), mask, lam=0.0)
    torch.testing.assert_close(td0, torch.tensor([[0.1, 0.7, 0.2, 0.6]]))


def test_rows_with_different_padding_are_independent():
    # Row 0 right-padded, row 1 left-padded, row 2 a single action: each equals its own computation.
    values = torch.tensor([[0.5, 0.2, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2], [0.0, 0.0, 0.0, 0.9]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    rewards = torch.tensor([1.0, 1.0, -0.5])
    targets = lambda_returns(values, rewards, mask, lam=0.8)
    y1 = 0.2 * 0.2 + 0.8 * 1.0
    torch.testing.assert_close(targets[0], torch.tensor([y1, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(targets[1], torch.tensor([0.0, 0.0, y1, 1.0]))
    torch.testing.assert_close(targets[2], torch.tensor([0.0, 0.0, 0.0, -0.5]))


def test_targets_carry_no_gradient_and_bad_lambda_is_rejected():
    values = torch.tensor([[0.1, 0.2]], requires_grad=True)
    assert not lambda_returns(values, torch.tensor([1.0]), torch.ones(1, 2)).requires_grad
    with pytest.raises(ValueError, match="lambda"):
        lambda_returns(values, torch.tensor([1.0]), torch.ones(1, 2), lam=1.5)


def test_masked_mse_ignores_masked_positions():
    pred = torch.tensor([[1.0, 5.0, 3.0]])
    target = torch.tensor([[0.0, -100.0, 1.0]])
    mask = torch.tensor([[1, 0, 1]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 4) / 2)

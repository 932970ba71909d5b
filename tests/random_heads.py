"""Value models with a random (non-zero) head for steering tests: a zero head steers nothing."""

import torch


def randomized(model, seed: int, std: float = 0.3):
    """model with its head's weight and bias drawn from N(0, std^2), seeded; in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * std)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=gen) * std)
    return model.eval()

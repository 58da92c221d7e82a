"""Gradient injection: a scalar loss whose gradient with respect to the latents is a given tensor.

``inject(x, grad, weight)`` returns L with dL/dx == weight * grad. Its value is the value of the
usual "target = (x - grad).detach(); 0.5 * ((x - target) ** 2).sum()" form, 0.5 * weight *
||grad||^2, but its backward returns weight * grad bit-exactly: the subtraction form recovers grad
as x - (x - grad), which rounds whenever |x| >> |grad| (fp32 latents ~1, gradients ~1e-4 after
the script's / 1000). The math is fp32: x is cast with a differentiable .float(), so a fp16/bf16
latent receives the fp32 gradient cast back to its dtype only at the cast.

Sum the injected losses of all views (and the regularisers) and call backward ONCE.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _InjectGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, grad: Tensor, weight: float) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.weight = weight
        return 0.5 * weight * grad.square().sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        # Multiplying by 1.0 is exact in IEEE arithmetic, so weight 1 returns grad bit for bit.
        return grad * (grad_output * ctx.weight), None, None


def inject(x: Tensor, grad: Tensor, weight: float = 1.0) -> Tensor:
    """Scalar fp32 loss with d loss / d x == weight * grad (grad is detached and cast to fp32)."""
    if x.shape != grad.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match latents {tuple(x.shape)}")
    return _InjectGradient.apply(x.float(), grad.detach().float().to(x.device), float(weight))

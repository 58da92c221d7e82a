"""The one way a trainer applies its loss: backward, one gradient all-reduce, the non-finite guard, the step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations produced non-finite gradients; the run stopped without saving them."""


def average_gradients(params: list[nn.Parameter], world_size: int) -> tuple[Tensor, Tensor]:
    """Every parameter's gradient averaged over processes with ONE all-reduce of their flat concatenation, as DDP
    does (a parameter without a gradient counts as zeros, so every process reduces the same layout); returns the flat
    float32 gradient and this process's own gradient norm."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    local_norm = torch.linalg.vector_norm(flat)
    if world_size > 1:
        torch.distributed.all_reduce(flat)
        flat /= world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].reshape(g.shape).to(p.dtype)
            offset += g.numel()
    return flat, local_norm


def calibrate_sgd(optimizer: torch.optim.Optimizer, grad_rms: float, step: float) -> bool:
    """Set an uncalibrated SGD group's lr so that a constant gradient of RMS ``grad_rms`` would reach steady steps
    lr * grad / (1 - momentum) of RMS ``step``; a zero gradient leaves it for the next step. True when set now."""
    group = optimizer.param_groups[0]
    if group["calibrated"] or not (grad_rms > 0 and math.isfinite(grad_rms)):
        return False
    group["lr"] = step * (1 - group["momentum"]) / grad_rms
    group["calibrated"] = True
    return True


class GradientStep:
    """backward (scaled under fp16), the averaged gradient, and the optimizer's step unless that gradient is
    non-finite: then the step is skipped and counted, and ``max_nonfinite_in_row`` skips in a row raise
    NonFiniteError (its message ends with ``hint``, the trainer's advice). The counters are a checkpoint's shared
    state (state/load_state), the GradScaler's state each process's own (rank_state/load_rank_state)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        world_size: int = 1,
        scaler: torch.amp.GradScaler | None = None,
        max_nonfinite_in_row: int = 20,
        hint: str = "resume from the last checkpoint with a lower learning rate",
    ) -> None:
        self.params = params
        self.optimizer = optimizer
        self.world_size = world_size
        self.scaler = scaler
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.hint = hint
        self.skipped = 0
        self.nonfinite_in_row = 0

    def __call__(
        self, loss: Tensor, iteration: int, before_step: Callable[[float, int], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Apply ``loss`` of iteration ``iteration`` (1-based, for the message); ``before_step(grad_norm, numel)``
        runs between a finite reduction and the step (SGD's calibration). Returns grad_norm, grad_norm_local,
        skipped (this step) and skipped_total."""
        self.optimizer.zero_grad(set_to_none=False)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        flat, local_norm = average_gradients(self.params, self.world_size)
        grad_norm = torch.linalg.vector_norm(flat)
        out: dict[str, Any] = {"grad_norm": float(grad_norm), "grad_norm_local": float(local_norm)}
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.nonfinite_in_row = 0
            if before_step is not None:
                out.update(before_step(float(grad_norm), flat.numel()))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.skipped += 1
            self.nonfinite_in_row += 1
            self.optimizer.zero_grad(set_to_none=False)
        if self.scaler is not None:
            self.scaler.update()
        out["skipped"] = int(not finite)
        out["skipped_total"] = self.skipped
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} iterations in a row had non-finite gradients (up to iteration {iteration}); "
                f"stopped without saving them. {self.hint}"
            )
        return out

    def state(self) -> dict[str, int]:
        return {"skipped": self.skipped, "nonfinite_in_row": self.nonfinite_in_row}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.skipped = int(meta["skipped"])
        self.nonfinite_in_row = int(meta["nonfinite_in_row"])

    def rank_state(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_rank_state(self, meta: dict[str, Any]) -> None:
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])

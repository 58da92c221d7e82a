"""Where computation runs: a torch device named by the user, checked to be usable on this machine."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """The device named, or (None / "") cuda when available, else cpu. A name that is unknown or not usable here
    raises ValueError naming the devices this machine has."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"device {name!r} is not usable here ({reason}); available: {', '.join(available)}") from None
    return device

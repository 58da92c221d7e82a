"""Regularisers of the stylisation run: relative distance of tri-grids (pure) and LPIPS-alex."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.weight_files import WeightsError, read_state_dict, state_problems, weights_budget


def _plane_axis_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared distance over the plane axis, per location: (N, 3, ...) -> (N, ...)."""
    return (a.float() - b.float()).pow(2).sum(dim=1)


def relative_distance(
    frozen_prev: Tensor, frozen_cur: Tensor, trainable_prev: Tensor, trainable_cur: Tensor, eps: float = 1e-8
) -> Tensor:
    """Relative-distance regulariser between identities (DiffusionGAN3D, as the LD script uses it).

    mean | ||T'_i - T'_j||^2 / (||T_i - T_j||^2 + eps) - 1 |, T the frozen tri-grids, T' the
    trainable ones, i the previous identity (T'_i detached), j the current one. Tri-grids are
    (N, 3, C*D, R, R) or the backbone's (N, 3*C*D, R, R); the norm runs over the plane axis,
    elementwise per location. Zero when the trainable generator keeps every pairwise distance.
    """
    shapes = {frozen_prev.shape, frozen_cur.shape, trainable_prev.shape, trainable_cur.shape}
    if len(shapes) != 1:
        raise ValueError(f"relative_distance needs four tri-grids of one shape, got {sorted(map(tuple, shapes))}")

    def planes(t: Tensor) -> Tensor:
        return t if t.dim() == 5 else t.reshape(t.shape[0], 3, -1, *t.shape[-2:])

    d_frozen = _plane_axis_sq_dist(planes(frozen_prev), planes(frozen_cur))
    d_trainable = _plane_axis_sq_dist(planes(trainable_prev).detach(), planes(trainable_cur))
    return torch.mean(torch.abs(d_trainable / (d_frozen + eps) - 1))


# LPIPS (Zhang et al. 2018), AlexNet variant v0.1, as the LD script's optional Tweedie-target loss.
# Input scaling of the lpips package: x in [-1, 1] -> (x - shift) / scale.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision's AlexNet `features`: (index in the Sequential, out channels, kernel, stride, padding).
_ALEX_CONVS = ((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))
_ALEX_POOL_AFTER = (0, 3)  # a 3x3 / 2 max-pool follows the first two convolutions (after their ReLU)
# torchvision's alexnet().classifier (256 x 6 x 6 -> 4096 -> 4096 -> 1000), in its state dicts beside the features.
_ALEX_CLASSIFIER = ((256 * 6 * 6, 4096), (4096, 4096), (4096, 1000))


def _alexnet_numel() -> int:
    """Values in a torchvision AlexNet state dict (61,100,840): the file's budget."""
    inputs = (3, *(out for _, out, *_ in _ALEX_CONVS[:-1]))
    features = sum(out * cin * k * k + out for cin, (_, out, k, _, _) in zip(inputs, _ALEX_CONVS, strict=True))
    return features + sum(i * o + o for i, o in _ALEX_CLASSIFIER)


class LPIPS(nn.Module):
    """LPIPS-alex distance d(x, y) per sample, from LOCAL weights (nothing is downloaded).

    alexnet: a torchvision AlexNet state dict (keys ``features.{0,3,6,8,10}.{weight,bias}``; other
    keys such as the classifier's are ignored). linear: the lpips package's ``weights/v0.1/alex.pth``
    (keys ``lin{0..4}.model.1.weight``, shapes (1, C, 1, 1)). Both are read with weights_only
    torch.load or safetensors. d = sum_l mean_hw || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2
    over the five ReLU outputs. The network is frozen; gradients flow to the images.
    """

    def __init__(self, alexnet: dict[str, Tensor], linear: dict[str, Tensor]) -> None:
        super().__init__()
        in_ch = 3
        self.convs = nn.ModuleList()
        for idx, out_ch, k, s, p in _ALEX_CONVS:
            conv = nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p)
            conv.load_state_dict({"weight": alexnet[f"features.{idx}.weight"], "bias": alexnet[f"features.{idx}.bias"]})
            self.convs.append(conv)
            in_ch = out_ch
        self.lins = nn.ParameterList(
            [nn.Parameter(linear[f"lin{i}.model.1.weight"].float()) for i in range(len(_ALEX_CONVS))]
        )
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).reshape(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, alexnet: str | Path, linear: str | Path) -> LPIPS:
        """From the two local files, each checked for the keys and shapes the network needs (WeightsError)."""
        return cls(_read_state(alexnet, "the AlexNet backbone", _alexnet_shapes()),
                   _read_state(linear, "the LPIPS linear layers", _linear_shapes()))  # fmt: skip

    def _features(self, x: Tensor) -> list[Tensor]:
        h = (x.float() - self.shift) / self.scale
        feats = []
        for (idx, *_), conv in zip(_ALEX_CONVS, self.convs, strict=True):
            h = F.relu(conv(h))
            feats.append(h)
            if idx in _ALEX_POOL_AFTER:
                h = F.max_pool2d(h, 3, 2)
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(N,) distances between images x and y in [-1, 1] (N, 3, H, W)."""
        total = torch.zeros(x.shape[0], device=x.device)
        for fx, fy, lin in zip(self._features(x), self._features(y), self.lins, strict=True):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((nx - ny).pow(2), lin).mean(dim=(1, 2, 3))
        return total


# torchvision's AlexNet weights as torch.hub caches them (the lpips package's first use downloads this file).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# The linear layers the lpips package ships, inside its package folder.
LPIPS_LINEAR_FILE = Path("weights", "v0.1", "alex.pth")


def cached_alexnet() -> Path:
    """Where torch.hub caches torchvision's AlexNet weights (TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def installed_lpips_linear() -> Path | None:
    """The linear layers of an installed lpips package (found without importing it), None when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / LPIPS_LINEAR_FILE


def find_lpips_weights(alexnet: str, linear: str) -> tuple[Path | None, Path | None]:
    """(AlexNet, linear layers) of LPIPS-alex: the files named, else the torch hub cache's AlexNet and the installed
    lpips package's linear layers; None for one that is not there."""
    found = []
    for named, default in ((alexnet, cached_alexnet()), (linear, installed_lpips_linear())):
        path = Path(named) if named else default
        found.append(path if path is not None and path.is_file() else None)
    return found[0], found[1]


def _alexnet_shapes() -> dict[str, tuple[int, ...]]:
    """The feature convolutions' keys and shapes in a torchvision AlexNet state dict."""
    shapes, in_ch = {}, 3
    for idx, out_ch, k, _, _ in _ALEX_CONVS:
        shapes[f"features.{idx}.weight"], shapes[f"features.{idx}.bias"] = (out_ch, in_ch, k, k), (out_ch,)
        in_ch = out_ch
    return shapes


def _linear_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the lpips package's alex.pth: one (1, C, 1, 1) weight per feature layer."""
    return {f"lin{i}.model.1.weight": (1, out_ch, 1, 1) for i, (_, out_ch, *_) in enumerate(_ALEX_CONVS)}


def _read_state(path: str | Path, what: str, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A state dict (.safetensors, or a .pth read weights-only, possibly under "state_dict") of ``what``, within
    the budget of a torchvision AlexNet's values (the larger of the two files), holding every ``expected`` key at
    its shape (other keys, such as AlexNet's classifier, are ignored); WeightsError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist (LPIPS needs local weights; nothing is downloaded)")
    hint = f"give {what} as a plain state dict"
    state = read_state_dict(path, weights_budget(_alexnet_numel()), WeightsError, hint, ("state_dict",))
    problems = state_problems(expected, {k: tuple(v.shape) for k, v in state.items() if k in expected})
    if problems:
        raise WeightsError(f"{path}: not {what} ({'; '.join(problems)}); {hint}")
    return state

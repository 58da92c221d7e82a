"""Analytic score priors: Gaussian-mixture data distributions whose noise prediction is exact.

Images are their own "latents" (identity encode/decode). For a data density p_0 and the DDPM
forward process x_t = sqrt(abar_t) x_0 + sigma_t eps (sigma_t = sqrt(1 - abar_t)), the ideal
eps-predictor is eps(x_t) = -sigma_t grad log p_t(x_t), and Tweedie's formula gives the
posterior mean x0_hat = E[x_0 | x_t] = (x_t - sigma_t eps) / sqrt(abar_t). Hence, for two
prompts (cond c, uncond u) at the same x_t:

    eps_c - eps_u = -(sqrt(abar_t) / sigma_t) (x0_hat_c - x0_hat_u),

so the guidance direction -(eps_c - eps_u) points from the unconditional posterior mean towards
the conditional one. Both priors below are finite Gaussian mixtures, so p_t stays a Gaussian
mixture and log p_t, its score and x0_hat are closed forms.

Prompt embeddings are mixture-weight vectors over the prior's named components, shape (1, 1, K):
a prompt is the one-hot of its component, the negative prompt "" is the unconditional mixture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from headstyle.priors.base import NoiseQuery, PromptEmbeds, add_noise, ddim_timesteps

UNCONDITIONAL = ""


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """abar_t of Stable Diffusion's "scaled_linear" schedule (betas linear in sqrt), float32 like diffusers."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class AnalyticPrior:
    """ScorePrior over images with an exact eps; subclasses give log p_t and its score for weight vectors.

    components: names of the mixture components (prompts). uncond_weights: the unconditional
    mixture over those components (the negative prompt "" maps to it). compute_dtype: float64 is
    useful in tests that compare against autograd.
    """

    num_train_timesteps = 1000
    steps_offset = 1
    control_names: frozenset[str] = frozenset()
    takes_content = False
    predicts_cond_only = False

    def __init__(
        self,
        components: list[str],
        uncond_weights: Tensor,
        image_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(set(components)) != len(components):
            raise ValueError(f"component names must be unique, got {components}")
        self.components = list(components)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_channels = self.image_shape[0]
        self.image_size = self.image_shape[-1]
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        w = uncond_weights.to(self.device, torch.float64)
        if w.shape != (len(components),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"uncond_weights must be {len(components)} non-negative numbers with a positive sum")
        self.uncond_weights = (w / w.sum()).to(compute_dtype)
        self.alphas_cumprod = sd_alphas_cumprod(self.num_train_timesteps).to(self.device)

    @property
    def dim(self) -> int:
        """D = C * H * W, the flattened image dimension."""
        return math.prod(self.image_shape)

    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        return ddim_timesteps(self.num_train_timesteps, num_inference_steps, self.steps_offset).to(self.device)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return add_noise(self.alphas_cumprod, x0, eps, t)

    def encode(self, images: Tensor) -> Tensor:
        """Identity codec: images in [-1, 1] are the latents."""
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float()

    def prompt_weights(self, prompt: str) -> Tensor:
        """Mixture weights (K,) a prompt stands for: one-hot of its component, or the unconditional mixture for ""."""
        if prompt == UNCONDITIONAL:
            return self.uncond_weights.clone()
        if prompt not in self.components:
            known = ", ".join(repr(c) for c in self.components if c != UNCONDITIONAL)
            raise ValueError(f"unknown prompt {prompt!r} for this analytic prior; known prompts: {known} (or '')")
        w = torch.zeros(len(self.components), device=self.device, dtype=self.compute_dtype)
        w[self.components.index(prompt)] = 1.0
        return w

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """(1, 1, K) mixture-weight "embeddings": cond = the prompt's, uncond = the negative prompt's."""
        return PromptEmbeds(
            uncond=self.prompt_weights(negative_prompt).reshape(1, 1, -1),
            cond=self.prompt_weights(prompt).reshape(1, 1, -1),
        )

    def _abar(self, t: Tensor, n: int) -> Tensor:
        t = t.to(self.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have one timestep per sample ({n}), got shape {tuple(t.shape)}")
        return self.alphas_cumprod[t].to(self.compute_dtype)

    def _flat(self, x_t: Tensor) -> Tensor:
        if tuple(x_t.shape[1:]) != self.image_shape:
            raise ValueError(f"x_t must be (N, {', '.join(map(str, self.image_shape))}), got {tuple(x_t.shape)}")
        return x_t.to(self.device, self.compute_dtype).reshape(x_t.shape[0], -1)

    def _weights(self, embeds: Tensor, n: int) -> Tensor:
        w = embeds.to(self.device, self.compute_dtype).reshape(embeds.shape[0], -1)
        if w.shape[1] != len(self.components):
            raise ValueError(f"prompt embeddings must weigh {len(self.components)} components, got {w.shape[1]}")
        return w.expand(n, -1) if w.shape[0] == 1 else w

    def _log_density_and_score(self, x: Tensor, abar: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """log p_t(x) (B,) and grad_x log p_t(x) (B, D) for flattened x (B, D) of the weighted mixture."""
        raise NotImplementedError

    def log_density(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """Exact log p_t(x_t | y) (N,), y given by (N or 1, 1, K) mixture weights; differentiable in x_t."""
        x = self._flat(x_t)
        return self._log_density_and_score(x, self._abar(t, x.shape[0]), self._weights(embeds, x.shape[0]))[0]

    def eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """eps(x_t) = -sigma_t grad log p_t(x_t | y), in the compute dtype, shaped like x_t."""
        x = self._flat(x_t)
        abar = self._abar(t, x.shape[0])
        score = self._log_density_and_score(x, abar, self._weights(embeds, x.shape[0]))[1]
        return (-(1.0 - abar).sqrt()[:, None] * score).reshape(x_t.shape)

    def x0_mean(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """Tweedie posterior mean E[x_0 | x_t, y] = (x_t + sigma_t^2 grad log p_t) / sqrt(abar_t)."""
        x = self._flat(x_t)
        abar = self._abar(t, x.shape[0])
        score = self._log_density_and_score(x, abar, self._weights(embeds, x.shape[0]))[1]
        return ((x + (1.0 - abar)[:, None] * score) / abar.sqrt()[:, None]).reshape(x_t.shape)

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]:
        """(eps_uncond, eps_cond) float32 per query, from ONE evaluation over all queries stacked.

        Differentiable in x_t (objectives that differentiate through the denoiser, e.g. IDS, need it);
        wrap in torch.no_grad() otherwise.
        """
        if not queries:
            return []
        xs, ts, ws = [], [], []
        for q in queries:
            n = q.x_t.shape[0]
            xs.append(self._flat(q.x_t))
            ts.append(self._abar(q.t, n))
            ws.append((self._weights(q.prompt.uncond, n), self._weights(q.prompt.cond, n)))
        x = torch.cat(xs)
        abar = torch.cat(ts)
        weights = torch.cat([torch.cat([w[0] for w in ws]), torch.cat([w[1] for w in ws])])
        abar2 = torch.cat([abar, abar])
        score = self._log_density_and_score(torch.cat([x, x]), abar2, weights)[1]
        eps = (-(1.0 - abar2).sqrt()[:, None] * score).float()
        eps_u, eps_c = eps.chunk(2)
        out, start = [], 0
        for q in queries:
            n = q.x_t.shape[0]
            shape = (n, *self.image_shape)
            out.append((eps_u[start : start + n].reshape(shape), eps_c[start : start + n].reshape(shape)))
            start += n
        return out


def _mixture(log_w: Tensor, log_comp: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Combine K components: log_w, log_comp (B, K), scores (B, K, D) -> log p (B,), score (B, D)."""
    logits = log_w + log_comp
    log_p = torch.logsumexp(logits, dim=1)
    resp = torch.softmax(logits, dim=1)
    return log_p, torch.einsum("bk,bkd->bd", resp, scores)


class GaussianPrior(AnalyticPrior):
    """p_0(x | y) = N(mu_y, U_y U_y^T + s_y^2 I) per prompt y; unconditional = mixture over prompts.

    At noise level t: p_t = N(sqrt(abar) mu_y, abar U_y U_y^T + (abar s_y^2 + 1 - abar) I); the
    inverse and log-determinant use the Woodbury identity, so cost is O(D r^2) per prompt.

    means: prompt -> mu_y (C, H, W). factors: prompt -> U_y (r, C, H, W), rows = principal directions
    scaled by their standard deviations (omit for isotropic). iso_std: s_y, one value or per prompt.
    uncond_weights: prompt -> mixture weight of the unconditional density (default uniform).
    """

    def __init__(
        self,
        means: Mapping[str, Tensor],
        factors: Mapping[str, Tensor] | None = None,
        iso_std: float | Mapping[str, float] = 0.1,
        uncond_weights: Mapping[str, float] | None = None,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        names = list(means)
        if not names:
            raise ValueError("GaussianPrior needs at least one prompt mean")
        shape = tuple(means[names[0]].shape)
        w = torch.tensor([1.0 if uncond_weights is None else float(uncond_weights.get(n, 0.0)) for n in names])
        super().__init__(names, w, shape, device, compute_dtype)
        factors = factors or {}
        self.means = torch.stack([self._check(means[n], shape, n).reshape(-1) for n in names]).to(
            self.device, compute_dtype
        )
        self.factors = [
            self._check(factors[n], (factors[n].shape[0], *shape), n)
            .reshape(factors[n].shape[0], -1)
            .T.to(self.device, compute_dtype)
            if n in factors
            else torch.zeros(self.dim, 0, device=self.device, dtype=compute_dtype)
            for n in names
        ]
        stds = {n: float(iso_std) for n in names} if not isinstance(iso_std, Mapping) else dict(iso_std)
        if any(stds.get(n, -1.0) < 0 for n in names):
            raise ValueError("iso_std must give a non-negative standard deviation for every prompt")
        self.iso_var = torch.tensor([stds[n] ** 2 for n in names], device=self.device, dtype=compute_dtype)

    @staticmethod
    def _check(t: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"prompt {name!r}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        return t

    def _log_density_and_score(self, x: Tensor, abar: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        d_total = x.shape[1]
        log_comps, scores = [], []
        for k, u in enumerate(self.factors):
            c = abar * self.iso_var[k] + 1.0 - abar  # (B,) isotropic variance at t
            d = x - abar.sqrt()[:, None] * self.means[k]
            r = u.shape[1]
            if r:
                # Cov_t = A A^T + c I with A = sqrt(abar) U; M = c I_r + A^T A
                gram = u.T @ u
                m = c[:, None, None] * torch.eye(r, dtype=x.dtype, device=x.device) + abar[:, None, None] * gram
                atd = abar.sqrt()[:, None] * (d @ u)
                y = torch.linalg.solve(m, atd)
                cinv_d = (d - abar.sqrt()[:, None] * (y @ u.T)) / c[:, None]
                logdet = (d_total - r) * c.log() + torch.linalg.slogdet(m)[1]
            else:
                cinv_d = d / c[:, None]
                logdet = d_total * c.log()
            quad = (d * cinv_d).sum(1)
            log_comps.append(-0.5 * (quad + logdet + d_total * math.log(2 * math.pi)))
            scores.append(-cinv_d)
        return _mixture(weights.log(), torch.stack(log_comps, 1), torch.stack(scores, 1))

    @torch.no_grad()
    def sample(self, prompt: str, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x_0 ~ p_0(x | prompt) (the mixture for ""), float32 (n, C, H, W)."""
        w = self.prompt_weights(prompt).float().cpu()
        ks = torch.multinomial(w, n, replacement=True, generator=generator)
        out = torch.empty(n, self.dim, dtype=self.compute_dtype)
        for i, k in enumerate(ks.tolist()):
            u = self.factors[k].cpu()
            z = torch.randn(u.shape[1], generator=generator, dtype=self.compute_dtype)
            noise = torch.randn(self.dim, generator=generator, dtype=self.compute_dtype)
            out[i] = self.means[k].cpu() + u @ z + self.iso_var[k].sqrt().cpu() * noise
        return out.reshape(n, *self.image_shape).float().to(self.device)


class ExemplarPrior(AnalyticPrior):
    """p_0(x | y) = mean over exemplars e_i of prompt y of N(e_i, b^2 I); unconditional = pooled mixture.

    Posterior mean at noise level t (bandwidth b, c = abar b^2 + 1 - abar):
        r_i = softmax_i(log pi_i - ||x_t - sqrt(abar) e_i||^2 / (2c)),
        E[x_0 | x_t] = sum_i r_i (e_i + (b^2 sqrt(abar) / c)(x_t - sqrt(abar) e_i)),
    which for b = 0 is the exact denoiser of the finite exemplar set (a softmax over exemplars).

    exemplars: prompt -> (n_y, C, H, W) images. unconditional: an optional extra exemplar set for
    the negative prompt "" (e.g. unstyled images); with uncond_includes_prompts the unconditional
    density pools it with every prompt's exemplars (weights proportional to counts), otherwise it
    is that set alone. Memory is O(N D) for N exemplars; one call costs two (B, D) x (D, N) matmuls.
    """

    def __init__(
        self,
        exemplars: Mapping[str, Tensor],
        bandwidth: float = 0.0,
        unconditional: Tensor | None = None,
        uncond_includes_prompts: bool = True,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        sets = {n: e for n, e in exemplars.items()}
        if UNCONDITIONAL in sets:
            raise ValueError("pass the unconditional exemplar set as `unconditional`, not under the prompt ''")
        if unconditional is not None:
            sets[UNCONDITIONAL] = unconditional
        if not sets or any(e.dim() != 4 or e.shape[0] == 0 for e in sets.values()):
            raise ValueError("each exemplar set must be a non-empty (n, C, H, W) tensor")
        names = list(sets)
        shape = tuple(sets[names[0]].shape[1:])
        if any(tuple(e.shape[1:]) != shape for e in sets.values()):
            raise ValueError(f"all exemplars must share one image shape, got {[tuple(e.shape) for e in sets.values()]}")
        counts = torch.tensor([float(sets[n].shape[0]) for n in names])
        if unconditional is not None and not uncond_includes_prompts:
            counts = torch.tensor([float(n == UNCONDITIONAL) for n in names])
        super().__init__(names, counts, shape, device, compute_dtype)
        if bandwidth < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
        self.bandwidth = float(bandwidth)
        self.exemplars = torch.cat([sets[n].reshape(sets[n].shape[0], -1) for n in names]).to(
            self.device, compute_dtype
        )
        self.sq_norms = (self.exemplars**2).sum(1)
        sizes = torch.tensor([sets[n].shape[0] for n in names], device=self.device)
        self.owner = torch.repeat_interleave(torch.arange(len(names), device=self.device), sizes)
        self.log_count = sizes.to(compute_dtype).log()

    def _log_density_and_score(self, x: Tensor, abar: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        d_total = x.shape[1]
        c = abar * self.bandwidth**2 + 1.0 - abar
        sa = abar.sqrt()
        # ||x - sqrt(abar) e_i||^2 without materialising (B, N, D); ||x||^2 is shared by all i
        cross = x @ self.exemplars.T
        logits = (sa[:, None] * cross - 0.5 * abar[:, None] * self.sq_norms[None]) / c[:, None]
        log_pi = weights.log()[:, self.owner] - self.log_count[self.owner][None]
        logits = logits + log_pi
        resp = torch.softmax(logits, dim=1)
        e_mean = resp @ self.exemplars
        score = (sa[:, None] * e_mean - x) / c[:, None]
        log_p = (
            torch.logsumexp(logits, dim=1)
            - 0.5 * (x**2).sum(1) / c
            - 0.5 * d_total * (torch.log(c) + math.log(2 * math.pi))
        )
        return log_p, score

    @torch.no_grad()
    def sample(self, prompt: str, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x_0 ~ p_0(x | prompt): a random exemplar of the mixture plus bandwidth noise."""
        w = self.prompt_weights(prompt).to(self.compute_dtype)
        per_exemplar = (w[self.owner] / self.log_count.exp()[self.owner]).float().cpu()
        idx = torch.multinomial(per_exemplar, n, replacement=True, generator=generator).to(self.device)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.compute_dtype).to(self.device)
        return (self.exemplars[idx] + self.bandwidth * noise).reshape(n, *self.image_shape).float()

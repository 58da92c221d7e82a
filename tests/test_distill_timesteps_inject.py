import pytest
import torch

from headstyle.distill.inject import inject
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.priors.base import ddim_timesteps


def test_ddim_step_sampler_matches_script_range_and_grid():
    g = torch.Generator().manual_seed(0)
    sample = sample_ddim_steps(2000, generator=g)
    assert sample.step_index.min() == 35 and sample.step_index.max() == 49
    assert set(sample.step_index.tolist()) == set(range(35, 50))
    assert torch.equal(sample.t, ddim_timesteps(1000, 50)[sample.step_index])
    assert set(sample.t.tolist()) == set(range(1, 282, 20))
    again = sample_ddim_steps(2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.t, sample.t)
    custom = sample_ddim_steps(10, 0, 1, timesteps=torch.tensor([900, 500]), generator=g)
    assert set(custom.t.tolist()) <= {900, 500}
    with pytest.raises(ValueError, match="within"):
        sample_ddim_steps(1, 35, 50)


def test_inject_gives_exactly_the_gradient():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4, 8, 8, generator=g) * 1e3).requires_grad_(True)
    grad = torch.randn(2, 4, 8, 8, generator=g) * 1e-4
    loss = inject(x, grad)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, 0.5 * grad.square().sum())
    loss.backward()
    # The target form would round here: x - (x - grad) != grad when |x| >> |grad|.
    assert not torch.equal((x - (x - grad)).detach(), grad)
    assert torch.equal(x.grad, grad)


def test_inject_many_views_one_backward_weighted_and_fp16():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 8, 8, generator=g).requires_grad_(True)
    view = p.unsqueeze(0) * 2.0
    mirror = p.flip(-1).unsqueeze(0).half()
    g_view = torch.randn(1, 4, 8, 8, generator=g)
    g_mirror = torch.randn(1, 4, 8, 8, generator=g)
    total = inject(view, g_view, 0.75) + inject(mirror, g_mirror, 0.25)
    total.backward()
    expected = 2.0 * 0.75 * g_view[0] + (0.25 * g_mirror[0]).half().float().flip(-1)
    assert torch.allclose(p.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        inject(view, g_view[:, :3])

"""The ScorePrior seam: every prior declares all of it, and a wrapper forwards every member through DelegatingPrior."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from typing_extensions import get_protocol_members

from headstyle.priors.analytic import ExemplarPrior, GaussianPrior
from headstyle.priors.base import CondOnlyPrior, ContentReferencePrior, DelegatingPrior, ScorePrior

SEAM = (ScorePrior, ContentReferencePrior, CondOnlyPrior)
MEMBERS = sorted(set().union(*(get_protocol_members(p) for p in SEAM)))
METHODS = sorted({m for p in SEAM for m, v in vars(p).items() if m in MEMBERS and inspect.isfunction(v)})


class _Recording:
    """A base prior whose every attribute is a distinct object and whose every method records the arguments it was
    given and returns a distinct object, so that a wrapper's answer can be traced to the base."""

    takes_content = True
    predicts_cond_only = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, object]] = []
        for name in MEMBERS:
            if name not in METHODS and name not in ("takes_content", "predicts_cond_only"):
                setattr(self, name, object())
        for name in METHODS:
            setattr(self, name, lambda *args, _name=name: self._record(_name, args))
        self.unet = object()  # StyleFusionPrior's default appearance modules

    def _record(self, name: str, args: tuple) -> object:
        result = object()
        self.calls.append((name, args, result))
        return result


def _declaration(method: str) -> inspect.Signature:
    return inspect.signature(next(vars(p)[method] for p in SEAM if method in vars(p)))


def _assert_forwarded(wrapper, base: _Recording, member: str) -> None:
    """``wrapper.member`` is the base's: the same object, or the base's method called with the same arguments
    (one distinct placeholder per parameter the seam declares) whose result comes back (None where declared)."""
    if member not in METHODS:
        assert getattr(wrapper, member) is getattr(base, member), member
        return
    declared = _declaration(member)
    args = tuple(object() for _ in list(declared.parameters)[1:])
    result = getattr(wrapper, member)(*args)
    name, got, returned = base.calls[-1]
    assert (name, got) == (member, args), member
    assert result is (None if declared.return_annotation in (None, "None") else returned), member


def test_the_seam_declares_what_callers_use():
    assert {"device", "predicts_cond_only", "takes_content", "predict_noise_cond", "set_content"} <= set(MEMBERS)


def test_delegating_prior_forwards_every_member_of_the_seam():
    """Each member is DelegatingPrior's own (none is left to a base class), and it answers from ``base``."""
    assert [m for m in MEMBERS if m not in vars(DelegatingPrior)] == []
    base = _Recording()
    wrapper = DelegatingPrior(base)
    assert isinstance(wrapper, ScorePrior) and isinstance(wrapper, ContentReferencePrior)
    assert isinstance(wrapper, CondOnlyPrior)
    for name in MEMBERS:
        _assert_forwarded(wrapper, base, name)


def test_delegating_prior_refuses_what_its_base_does_not_declare():
    base = GaussianPrior({"photo": torch.zeros(1, 2, 2)})
    wrapper = DelegatingPrior(base)
    assert not wrapper.takes_content and not wrapper.predicts_cond_only
    with pytest.raises(TypeError, match="predicts_cond_only"):
        wrapper.predict_noise_cond([])
    with pytest.raises(TypeError, match="takes_content"):
        wrapper.set_content(None)


def _style_fusion(base):
    from headstyle.attention.prior import StyleFusionPrior

    return StyleFusionPrior(base, torch.zeros(1, 4, 2, 2))


# Every wrapper of a prior in the package, and the members it changes on purpose (the rest is its base's).
WRAPPERS = {
    "StyleFusionPrior": (_style_fusion, {"takes_content", "set_content", "predict_noise", "predict_noise_cond"}),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_each_wrapper_forwards_every_member_it_does_not_change(name):
    make, changed = WRAPPERS[name]
    base = _Recording()
    wrapper = make(base)
    cls = type(wrapper)
    assert isinstance(wrapper, DelegatingPrior) and wrapper.base is base
    own = {m for m in MEMBERS if any(m in vars(k) for k in cls.__mro__[: cls.__mro__.index(DelegatingPrior)])}
    assert own == changed
    for member in sorted(set(MEMBERS) - changed):
        _assert_forwarded(wrapper, base, member)


def test_every_wrapper_in_the_package_is_listed():
    import headstyle

    pattern = re.compile(r"^class (\w+)\((?:[\w.]+, )*DelegatingPrior\b", re.M)
    found = {m.group(1) for f in Path(headstyle.__file__).parent.rglob("*.py") for m in pattern.finditer(f.read_text())}
    assert found == set(WRAPPERS)


def test_analytic_and_lab_priors_declare_the_seam():
    from headstyle.lab.prior.exemplar import build_lab_prior

    gauss = GaussianPrior({"photo": torch.zeros(1, 2, 2)})
    exemplar = ExemplarPrior({"photo": torch.zeros(2, 1, 2, 2)})
    lab, _ = build_lab_prior(identities=1, views=1, resolution=8, sr_factor=2)
    for prior in (gauss, exemplar, lab):
        assert isinstance(prior, ScorePrior)
        assert prior.device == torch.device("cpu")
        assert not prior.takes_content and not prior.predicts_cond_only

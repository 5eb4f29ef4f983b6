"""The common checks of every method, run over every family x every row of the table (tests/matrix.py, ``CASES``).

Every number is compared against an independent reference: the stock model (identity at init, remove), the same
model on a prefix or unpadded (causality, left padding), one full forward (decoding through the KV cache), a freshly
loaded copy (save / load), the unmerged model (merge). Which checks a row gets follows from the library's flags
(trainable, lambda schedule, mergeable) and the row options of :class:`matrix.Case`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from matrix import (
    CASES,
    Case,
    check_causality,
    check_generate_cache_equals_no_cache,
    check_gradients_reach_only_method_parameters,
    check_left_padding,
    check_remove_restores_stock,
    check_save_load_round_trip,
    patched_model,
)
from models import FAMILIES, inputs

import attndenoise as ad
from attndenoise import registry


def rows(keep: Callable[[Case], bool] = lambda c: True) -> list[Any]:
    """``(family, case)`` for every family and every row ``keep`` accepts."""
    return [pytest.param(f, c, id=f"{f}-{c.id}") for c in CASES if keep(c) for f in FAMILIES]


# -- the guard -----------------------------------------------------------------------------------------------------


def test_every_registered_method_has_a_row() -> None:
    """A method registered in the library but absent from the table would escape every common check."""
    assert {c.method for c in CASES} == set(ad.METHODS)
    assert len({c.id for c in CASES}) == len(CASES)
    for c in CASES:  # every row is a valid configuration (so a typo in an option fails here, not as a skip)
        assert c.config().name == c.method
        if c.identity is not None:
            c.config(**c.identity)


# -- identity at init ------------------------------------------------------------------------------------------------

#: (anneal_steps, lambda_schedule) of the identity check for a method driven by the lambda schedule
SCHEDULES = [(0, "paper"), (100, "paper"), (100, "linear")]


def identity_rows() -> list[Any]:
    out = []
    for c in CASES:
        if c.identity is None:
            continue
        for f in FAMILIES:
            if c.lambda_schedule:  # the schedules the row's identity options leave open
                out += [pytest.param(f, c, {"anneal_steps": t, "lambda_schedule": s}, id=f"{f}-{c.id}-{s}{t}")
                        for t, s in SCHEDULES if c.identity.get("anneal_steps", t) == t]
            else:
                out.append(pytest.param(f, c, {}, id=f"{f}-{c.id}"))
    return out


@pytest.mark.parametrize("family,case,schedule", identity_rows())
def test_identity_at_init(family: str, case: Case, schedule: dict[str, Any]) -> None:
    model = case.model(family)
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
        ad.apply(model, case.config(**{**schedule, **case.identity}))  # type: ignore[dict-item]
        out = model(x).logits
    assert (out - ref).abs().max() < 1e-5


# -- causality, cache, padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,case", rows(lambda c: c.causal))
def test_causality(family: str, case: Case) -> None:
    check_causality(patched_model(family, case))


@pytest.mark.parametrize("family,case", rows(lambda c: c.causal))
def test_generate_cache_equals_no_cache(family: str, case: Case) -> None:
    check_generate_cache_equals_no_cache(patched_model(family, case))


@pytest.mark.parametrize("family,case", rows())
def test_left_padding(family: str, case: Case) -> None:
    check_left_padding(patched_model(family, case))


# -- training, saving, merging, removing -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family,case", rows(lambda c: c.trainable))
def test_gradients_reach_only_method_parameters(family: str, case: Case, use_cache: bool) -> None:
    """With a cache (the default, ``store`` runs inside the cache's update) and without one."""
    check_gradients_reach_only_method_parameters(patched_model(family, case), use_cache=use_cache)


@pytest.mark.parametrize("family,case", rows())
def test_save_load_round_trip(family: str, case: Case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = patched_model(family, case)
    if case.lambda_schedule:
        ad.step(model, 7)
    fresh = check_save_load_round_trip(model, family, tmp_path, case.model)
    meta = json.loads((tmp_path / "attndenoise_config.json").read_text())
    assert meta["config"]["method"] == case.method
    assert {k: meta["config"][k] for k in case.options} == dict(case.options)
    if case.lambda_schedule:
        assert all(int(m.lam.step) == 7 for m in ad.method_modules(fresh).values())


@pytest.mark.parametrize("family,case", rows())
def test_remove_restores_stock(family: str, case: Case) -> None:
    check_remove_restores_stock(family, case.config(anneal_steps=0), build=case.model)


@pytest.mark.parametrize("family,case", rows(lambda c: c.mergeable))
def test_merge_equals_unmerged(family: str, case: Case) -> None:
    model = patched_model(family, case)
    x = inputs()
    with torch.no_grad():
        want = model(x).logits
    ad.merge(model)
    assert not any("attndenoise" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family,case", rows(lambda c: not c.mergeable))
def test_merge_is_refused(family: str, case: Case) -> None:
    model = patched_model(family, case)
    x = inputs()
    with torch.no_grad():
        want = model(x).logits
    with pytest.raises(ad.NotMergeableError, match="mergeable methods: " + ".*".join(registry.mergeable_methods())):
        ad.merge(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)  # a refused merge leaves the model as it was

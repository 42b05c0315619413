"""The dispatch point: argument, context manager and environment variable; reporting."""

import pytest
import torch

import groupnorm
from groupnorm import backends, group_norm

X = torch.randn(2, 8, 4, 4)


def test_argument_context_and_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    group_norm(X, 2, backend="reference")
    assert groupnorm.last_backend() == "reference"
    with groupnorm.use_backend("composite"):
        group_norm(X, 2)
        assert groupnorm.last_backend() == "composite"
        group_norm(X, 2, backend="reference")  # the argument wins over the context
        assert groupnorm.last_backend() == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    group_norm(X, 2)
    assert groupnorm.last_backend() == "reference"
    with groupnorm.use_backend("composite"):  # the context wins over the env var
        group_norm(X, 2)
        assert groupnorm.last_backend() == "composite"


def test_auto_picks_an_available_backend_and_backward_reports_too(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = X.clone().requires_grad_()
    y = group_norm(x, 2)
    expected = "numba" if backends.get("numba").available() is None else "composite"
    assert groupnorm.last_backend() == expected
    with groupnorm.use_backend("reference"):
        y.sum().backward()  # the backward resolves with the forward's request ("auto"), not the context
    assert groupnorm.last_backend() == expected


def test_unknown_and_unavailable_backends_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown groupnorm backend 'fast'.*composite"):
        group_norm(X, 2, backend="fast")
    with pytest.raises(ValueError, match="unknown groupnorm backend"):
        with groupnorm.use_backend("fast"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=r"\$GROUPNORM_BACKEND='nonsense' names no groupnorm backend.*or unset it"):
        group_norm(X, 2)
    monkeypatch.delenv(backends.ENV_VAR)
    for name, reason in groupnorm.available_backends().items():
        if reason is not None:
            with pytest.raises(RuntimeError, match=f"{name}.*unavailable here"):
                group_norm(X, 2, backend=name)
        assert name in backends.names()


def test_reference_backend_refuses_non_cpu_devices():
    meta = torch.empty(2, 8, 4, 4, device="meta")
    assert not backends.get("reference").supports(meta, "none")
    assert backends.get("composite").supports(meta, "none")


def test_use_backend_is_per_thread(monkeypatch):
    import threading

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def holder():
        with groupnorm.use_backend("reference"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    group_norm(X, 2)
    seen["other thread"] = groupnorm.last_backend()
    release.set()
    t.join()
    assert seen["other thread"] != "reference"


def test_context_is_read_at_run_time_inside_compiled_code(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    f = torch.compile(lambda t: group_norm(t, 2), fullgraph=True, backend="aot_eager")
    f(X)
    with groupnorm.use_backend("reference"):
        f(X)
        assert groupnorm.last_backend() == "reference"


def test_environment_variable_auto_and_padding(monkeypatch):
    monkeypatch.setenv("GROUPNORM_BACKEND", "auto")
    assert not backends.forced()  # "auto" keeps the fast lane
    monkeypatch.setenv("GROUPNORM_BACKEND", " reference ")
    group_norm(torch.randn(2, 4, 3), 2)
    assert groupnorm.last_backend() == "reference"


def test_nested_contexts_innermost_wins_and_each_exit_restores_the_outer(monkeypatch):
    """After a plain call (which loads the compiled fast lane where there is one): a use_backend()
    context must still keep calls off that lane, the innermost context wins ("auto" inside a forced
    one too), and leaving it restores the one around it."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    auto = "numba" if backends.get("numba").available() is None else "composite"
    group_norm(X, 2)
    assert groupnorm.last_backend() == auto
    with groupnorm.use_backend("composite"):
        group_norm(X, 2)
        assert groupnorm.last_backend() == "composite"
        with groupnorm.use_backend("reference"):
            group_norm(X, 2)
            assert groupnorm.last_backend() == "reference"
            with groupnorm.use_backend("auto"):
                group_norm(X, 2)
                assert groupnorm.last_backend() == auto
            group_norm(X, 2)
            assert groupnorm.last_backend() == "reference"
        group_norm(X, 2)
        assert groupnorm.last_backend() == "composite"
    group_norm(X, 2)
    assert groupnorm.last_backend() == auto


def test_last_backend_names_the_backward_too(monkeypatch):
    """last_backend() reports the most recent call, forward or backward: a backward run after
    another forward names the backend that ran it (the first forward's)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = X.clone().requires_grad_()
    y = group_norm(x, 2, backend="composite")
    group_norm(X, 2, backend="reference")
    assert groupnorm.last_backend() == "reference"
    y.sum().backward()
    assert groupnorm.last_backend() == "composite"


def test_an_unavailable_backend_is_listed_with_its_reason_and_refused_by_name(monkeypatch):
    """What get() records for a backend whose optional dependency is missing (here triton, not
    installed): available_backends() lists it with the reason, and asking for it by name, by
    context or by $GROUPNORM_BACKEND is an error that says why, not a fallback."""
    missing = backends._Unavailable("triton", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setitem(backends._loaded, "triton", missing)
    listed = groupnorm.available_backends()
    assert set(listed) == set(backends.names()) and listed["triton"] == missing.reason
    match = r"'triton' was requested but is unavailable here: ModuleNotFoundError: No module named 'triton'"
    with pytest.raises(RuntimeError, match=match):
        group_norm(X, 2, backend="triton")
    with groupnorm.use_backend("triton"), pytest.raises(RuntimeError, match=match):
        group_norm(X, 2)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=match):
        group_norm(X, 2)


def test_a_backend_that_does_not_take_the_input_is_refused_naming_those_that_do(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    meta = torch.empty(2, 8, 4, 4, device="meta")
    for name in ("reference", "numba"):
        with pytest.raises(RuntimeError, match=rf"'{name}' does not support torch.float32 input on meta; "
                                               r"use backend='auto' or one of: composite$"):
            group_norm(meta, 2, backend=name)
    assert group_norm(meta, 2).shape == meta.shape and groupnorm.last_backend() == "composite"  # what auto picks


def test_the_first_context_of_a_process_keeps_calls_off_the_fast_lane():
    """In a fresh process (no use_backend() context ever opened before, the fast lane loaded by a
    plain call): the very first context is obeyed too."""
    from helpers import run_fresh

    code = ("import os, torch, groupnorm\nos.environ.pop('GROUPNORM_BACKEND', None)\nx = torch.randn(2, 8, 4, 4)\n"
            "groupnorm.group_norm(x, 2)\nwith groupnorm.use_backend('composite'):\n    groupnorm.group_norm(x, 2)\n"
            "    assert groupnorm.last_backend() == 'composite', groupnorm.last_backend()\nprint('OBEYED')\n")
    run_fresh(code, "OBEYED")


def test_auto_by_name_is_the_automatic_choice(monkeypatch):
    """backend="auto" (what the refusal messages suggest) is accepted as an argument and as a context."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    auto = "numba" if backends.get("numba").available() is None else "composite"
    torch.testing.assert_close(group_norm(X, 2, backend="auto"), torch.nn.functional.group_norm(X, 2))
    assert groupnorm.last_backend() == auto
    with groupnorm.use_backend("reference"):
        group_norm(X, 2, backend="auto")  # the argument wins over the context
        assert groupnorm.last_backend() == auto

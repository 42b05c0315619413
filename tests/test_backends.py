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

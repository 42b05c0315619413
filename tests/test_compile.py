"""torch.library registration: opcheck, and torch.compile(fullgraph=True) on a model using the op."""

import pytest
import torch
from torch import nn
from torch.library import opcheck

import groupnorm

OP = torch.ops.groupnorm.forward.default


@pytest.mark.parametrize(
    "shape, G, layout, dtype, act, affine",
    [
        ((2, 8, 5, 3), 4, "contiguous", torch.float32, "silu", True),
        ((2, 8, 5, 3), 2, "channels_last", torch.float32, "none", True),
        ((2, 6, 3, 2, 2), 3, "channels_last_3d", torch.float64, "gelu", True),
        ((3, 4, 7), 2, "contiguous", torch.bfloat16, "relu", False),
        ((4, 6), 3, "contiguous", torch.float32, "none", True),
    ],
)
def test_opcheck(shape, G, layout, dtype, act, affine):
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    C = shape[1]
    w = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    b = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    opcheck(OP, (x, w, b, G, 1e-5, act, ""))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        groupnorm.GroupNorm(4, 16, activation="silu"),
        nn.Conv2d(16, 16, 3, padding=1),
        groupnorm.GroupNorm(num_channels=16, group_size=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def test_compile_fullgraph_forward_backward_matches_eager():
    eager = _model()
    compiled_src = _model()
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, fullgraph=True)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p1), p2 in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-4, msg=name)
    # the compiled graph calls our op, and autocast inside it keeps half precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = compiled_src[0](x)
        f = torch.compile(lambda t: groupnorm.group_norm(t, 4, activation="gelu"), fullgraph=True)
        assert f(h).dtype == torch.bfloat16


def test_compile_dynamic_shapes():
    m = groupnorm.GroupNorm(4, 16, activation="gelu")
    c = torch.compile(m, dynamic=True, fullgraph=True)
    for shape in [(2, 16, 5, 5), (3, 16, 7, 4), (1, 16, 9)]:
        x = torch.randn(shape, requires_grad=True)
        y = c(x)
        torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (ex,) = torch.autograd.grad(m(x).sum(), x)
        torch.testing.assert_close(gx, ex, atol=1e-4, rtol=1e-4)
    f = torch.compile(lambda t: groupnorm.group_norm(t, t.shape[1] // 4), dynamic=True, fullgraph=True)
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(f(x), torch.nn.functional.group_norm(x, 2), atol=1e-5, rtol=1e-5)


def test_torch_export_runs_saves_and_loads_in_a_fresh_process(tmp_path):
    """torch.export (the PT2 deployment path) records groupnorm::forward, also with a dynamic batch and
    a GroupNormAct's kept child; the saved program loads wherever groupnorm is imported."""
    from helpers import run_fresh

    from groupnorm.layers import GroupNormAct

    torch.manual_seed(0)
    tail = GroupNormAct(num_channels=16, num_groups=4)
    tail.add_module("act", nn.Hardswish())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), groupnorm.GroupNorm(4, 16, activation="silu"),
                          nn.Conv2d(16, 16, 3, padding=1), tail).eval()
    x = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch}})
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.groupnorm.forward.default) == 2
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x5)
    torch.testing.assert_close(program.module()(x5), expected, rtol=0, atol=0)
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    torch.save({"x": x5, "y": expected}, tmp_path / "io.pt")
    code = (
        "import torch, groupnorm\n"
        f"program = torch.export.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(program.module()(io['x']), io['y'], rtol=0, atol=0)\n"
        "print('LOADED')\n"
    )
    run_fresh(code, "LOADED")


def test_a_numpy_integer_group_count_under_compile_is_refused_with_the_fix():
    """Found in mutation round 4: eager group_norm takes a NumPy integer num_groups, but under
    torch.compile Dynamo hands it over as a 0-d array, which cannot be read without a graph break
    (torch's own F.group_norm passes it to its op unread; even int() on it breaks the graph). The
    error now says what to do."""
    import numpy as np

    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(groupnorm.group_norm(x, np.int64(4)), torch.nn.functional.group_norm(x, 4))  # eager
    compiled = torch.compile(lambda t: groupnorm.group_norm(t, np.int64(4)), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"make it a Python int with int\(\) outside the compiled code"):
        compiled(x)
    G = int(np.int64(4))
    fixed = torch.compile(lambda t: groupnorm.group_norm(t, G), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fixed(x), torch.nn.functional.group_norm(x, 4))

"""The README's Python examples run as written, and do what their comments say.

Each ```python block of README.md is executed, then checked: the quick start as it stands (it must
run when copied), the fragments after it with the names their first comment says they take (a
batch, a BatchNorm model, an optimizer and a loader) defined first. The timm block
needs timm (not a dependency: it would pull torchvision); scripts/check_timm.py covers it where
timm is installed, and test_integrations.py covers its norm+act call forms with timm-style modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
import archs

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(marker: str) -> str:
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, f"README has {len(found)} python blocks containing {marker!r}"
    return found[0]


def _small_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_every_python_block_is_checked_here():
    markers = ("groupnorm.group_norm(x, 32, weight", 'backend="composite"', "timm.create_model",
               "check_batch_independence", "PrivacyEngine")
    blocks = _blocks()
    assert len(blocks) == len(markers) and all(any(m in b for b in blocks) for m in markers), \
        "a README python block was added or changed: check it here"


def test_quick_start_block():
    ns = {}  # self-contained: it runs as copied
    exec(_block("groupnorm.group_norm(x, 32, weight"), ns)
    x, y, weight, bias = ns["x"], ns["y"], ns["weight"], ns["bias"]
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 32, weight, bias, eps=1e-5)), atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the output keeps the input's format
    assert ns["norm"].num_groups == 24 and "24" in repr(ns["norm"])  # the divisor policy's G for C = 48
    norms = [m for m in ns["model"].modules() if isinstance(m, groupnorm.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in ns["model"].modules())
    assert all(m.num_groups == 32 for m in norms)


def test_backend_selection_block():
    model = groupnorm.GroupNorm(32, 64)
    x = torch.randn(2, 64, 4, 4)
    ns = {"groupnorm": groupnorm, "x": x, "model": model}  # a fragment after the quick start
    exec(_block('backend="composite"'), ns)
    assert groupnorm.last_backend() == "reference"  # the context manager's call ran last
    assert groupnorm.available_backends()["composite"] is None


def test_conversion_block(capsys):
    ns = {"model": archs.resnet50()}
    exec(_block("check_batch_independence"), ns)
    model = ns["model"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    report = capsys.readouterr().out
    assert report.strip(), "check_batch_independence printed nothing"
    assert groupnorm.check_batch_independence(model, torch.randn(4, 3, 64, 64)).ok


def test_opacus_block():
    import opacus  # noqa: F401  (a test dependency: test_setup.py checks it is installed)
    torch.manual_seed(0)
    model = _small_bn_model()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
          "loader": torch.utils.data.DataLoader(data, batch_size=8)}
    exec(_block("PrivacyEngine"), ns)
    model, optimizer, loader = ns["model"], ns["optimizer"], ns["loader"]
    assert any(isinstance(m, groupnorm.GroupNorm) for m in model.modules())
    before = [p.detach().clone() for p in model.parameters()]
    for xb, yb in loader:  # one private epoch: per-sample gradients, clipping and noise
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert all(p.grad_sample is None or torch.isfinite(p.grad_sample).all() for p in model.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))

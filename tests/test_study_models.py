"""Study models: per-worker BN, norm injection, initialization, data order."""

import pytest
import torch
import torch.nn as nn

import groupnorm
from groupnorm.study.models import NORMS, WorkerBatchNorm2d, build_model, norm_layers
from groupnorm.study.train import epoch_order


def test_worker_bn_equals_bn_on_each_chunk():
    torch.manual_seed(0)
    W, n, C = 4, 3, 5
    x = torch.randn(W * n, C, 6, 6) * 3 + 1
    wbn = WorkerBatchNorm2d(C, workers=W)
    with torch.no_grad():
        wbn.weight.uniform_(0.5, 2)
        wbn.bias.uniform_(-1, 1)
    refs = [nn.BatchNorm2d(C) for _ in range(W)]
    for r in refs:
        r.load_state_dict(wbn.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = wbn(x1)
    y_ref = torch.cat([r(c) for r, c in zip(refs, x2.chunk(W))])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    # running statistics: the average of what each worker's own BN would hold
    torch.testing.assert_close(wbn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(wbn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    # eval: the running statistics, exactly like BatchNorm2d
    wbn.eval()
    refs[0].eval()
    refs[0].running_mean.copy_(wbn.running_mean)
    refs[0].running_var.copy_(wbn.running_var)
    torch.testing.assert_close(wbn(x), refs[0](x))


def test_worker_bn_without_affine_or_running_stats():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 5) * 2 - 1
    wbn = WorkerBatchNorm2d(4, workers=3, affine=False, track_running_stats=False)
    ref = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(3)])
    torch.testing.assert_close(wbn(x), ref, rtol=1e-5, atol=1e-5)


def test_worker_bn_needs_whole_workers():
    with pytest.raises(ValueError, match="does not split into 4 workers"):
        WorkerBatchNorm2d(3, workers=4)(torch.randn(6, 3, 4, 4))


@pytest.mark.parametrize("norm", NORMS)
def test_small_resnet_builds_for_every_norm(norm):
    torch.manual_seed(0)
    model = build_model("resnet-small", norm, in_channels=1, num_classes=10, image_size=28, workers=2, width=16)
    x = torch.randn(4, 1, 28, 28)
    model(x).sum().backward()
    norms = [m for _, m in norm_layers(model)]
    if norm in ("gn", "ln", "in", "gn+ws"):
        assert all(type(m) is groupnorm.GroupNorm for m in norms)  # our op, never torch's
        groups = {(m.num_channels, m.num_groups) for m in norms}
        expect = {"gn": {(16, 2), (32, 4), (64, 8)}, "gn+ws": {(16, 2), (32, 4), (64, 8)},
                  "ln": {(16, 1), (32, 1), (64, 1)}, "in": {(16, 16), (32, 32), (64, 64)}}[norm]
        assert groups == expect
    elif norm == "bn":
        assert all(isinstance(m, WorkerBatchNorm2d) and m.workers == 2 for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, groupnorm.StdConv2d) == (norm == "gn+ws") for c in convs)
    # the last norm of every residual block starts at gamma = 0; the others at 1
    last = {id(b.last_norm) for b in model.modules() if hasattr(b, "last_norm")}
    for m in norms:
        assert torch.all(m.weight == (0.0 if id(m) in last else 1.0))


@pytest.mark.parametrize("stride, sizes", [(1, [28, 14, 7]), (2, [14, 7, 4]), (4, [7, 4, 2])])
def test_small_resnet_stem_stride_sets_the_feature_maps(stride, sizes):
    model = build_model("resnet-small", "gn", in_channels=1, num_classes=10, image_size=28, stem_stride=stride)
    seen = []
    for block in model.layers:
        block.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen == sizes
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == (((4, 4), (4, 4)) if stride == 4 else ((3, 3), (stride, stride)))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_large_resnets_build(name):
    model = build_model(name, "gn", in_channels=3, num_classes=7, image_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert any(m.num_channels == 2048 for _, m in norm_layers(model)) == (name == "resnet50")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown norm 'xx'"):
        build_model("resnet-small", "xx", in_channels=1, num_classes=2, image_size=28)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", "gn", in_channels=1, num_classes=2, image_size=28)


def test_epoch_order():
    y = torch.arange(200) % 10
    iid = epoch_order(y, seed=1, epoch=0, workers=4, batch=8, sampling="iid")
    assert iid.shape == (6, 32) and len(set(iid.flatten().tolist())) == 192
    assert torch.equal(iid, epoch_order(y, 1, 0, 4, 8, "iid"))
    assert not torch.equal(iid, epoch_order(y, 1, 1, 4, 8, "iid"))
    cls = epoch_order(y, seed=1, epoch=0, workers=4, batch=5, sampling="class")
    chunks = y[cls].view(len(cls), 4, 5)
    assert torch.all(chunks == chunks[..., :1])  # each worker's batch is one class
    assert len(set(chunks[..., 0].flatten().tolist())) > 1


def test_learning_rate_scales_with_batch_and_warms_up_from_the_first_step():
    from groupnorm.study.train import Recipe, learning_rate

    r = Recipe(lr=0.1, warmup_epochs=1.0)
    assert learning_rate(r, 64, 0, 100, 10) == pytest.approx(0.2 / 10)  # peak 0.1 x 64/32, step 1 of 10
    assert learning_rate(r, 64, 10, 100, 10) == pytest.approx(0.2)
    assert learning_rate(r, 64, 99, 100, 10) < 0.01  # cosine to ~0


def test_class_sampling_deals_the_class_chunks_in_shuffled_order():
    """Each worker's batch is one class, but which class goes to which worker at a step is shuffled."""
    y = torch.arange(200) % 10
    cls = epoch_order(y, seed=1, epoch=0, workers=4, batch=5, sampling="class")
    labels = y[cls].view(len(cls), 4, 5)
    assert all(len(set(b.tolist())) == 1 for b in labels.reshape(-1, 5))
    assert any(len(set(row.tolist())) > 1 for row in labels[..., 0])


def test_worker_bn_cumulative_average_momentum():
    """momentum=None (cumulative moving average) as nn.BatchNorm2d: each worker's BN would hold the
    plain average of its batches' statistics; ours holds the average of those over workers."""
    from groupnorm.study.models import WorkerBatchNorm2d

    torch.manual_seed(0)
    W, C = 2, 3
    wbn = WorkerBatchNorm2d(C, workers=W, momentum=None)
    refs = [nn.BatchNorm2d(C, momentum=None) for _ in range(W)]
    for _ in range(3):
        x = torch.randn(W * 4, C, 5, 5) * 2 + 1
        wbn(x)
        for r, chunk in zip(refs, x.chunk(W)):
            r(chunk)
    torch.testing.assert_close(wbn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(wbn.running_var, torch.stack([r.running_var for r in refs]).mean(0))


def test_allreduce_bn_on_one_rank_is_batchnorm(tmp_path):
    """On a one-process gloo group AllReduceBatchNorm2d is nn.BatchNorm2d: output, gradients, and
    running statistics (the running variance unbiased, as BatchNorm's)."""
    import torch.distributed as dist

    from groupnorm.study.models import AllReduceBatchNorm2d

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ours, ref = AllReduceBatchNorm2d(3), nn.BatchNorm2d(3)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2)
            ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(4, 3, 2, 3) * 3 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def test_imagenet_resnets_keep_the_small_stem_up_to_32_px():
    """resnet18/50 on images of 32 px or less: the 3x3 stride-1 stem, no max pool."""
    from groupnorm.study.models import build_model

    for size, kernel in ((32, (3, 3)), (33, (7, 7))):
        model = build_model("resnet18", "gn", in_channels=3, num_classes=10, image_size=size)
        assert model.stem[0].kernel_size == kernel, size
        assert any(isinstance(m, nn.MaxPool2d) for m in model.stem) == (size > 32)

"""One training run of the study: (norm, per-worker batch, seed, worker sampling) under a shared recipe.

The paper's protocol: ``workers`` workers each take a per-worker batch of ``batch`` images, so
the global batch is ``workers * batch``; the learning rate is ``lr * batch / 32`` (linear
scaling); every run trains the same number of epochs with SGD, momentum and weight decay; the
reported error is the median validation error over the final epochs.

On one process the workers are virtual: the global batch is one tensor whose k-th chunk is
worker k's batch, and ``bn`` normalizes each chunk with its own statistics. Under ``torchrun``
(RANK / WORLD_SIZE set) each process is one worker holding its chunk of the same global batch,
wrapped in DistributedDataParallel; the data order is the same, so the two give the same steps.

The data order and augmentation of epoch e depend only on (seed, e), so a run resumed from its
per-epoch checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import io
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from groupnorm.study.data import DataSet, apply_crop_flip, channel_stats, to_float
from groupnorm.study.models import BATCH_NORMS, WorkerBatchNorm2d, build_model, norm_layers


@dataclass(frozen=True)
class Recipe:
    """Everything shared by all runs of a study; its hash keys the records."""

    data: str = "default"
    train_size: int = 0  # 0: all training images
    val_size: int = 0  # 0: all validation images
    image_size: int = 64  # only for image folders
    model: str = "resnet-small"
    width: int = 32
    blocks: int = 1
    stem_stride: int = 1
    groups: int = 32
    min_group_channels: int = 8
    workers: int = 8
    epochs: int = 10
    lr: float = 0.1  # for a per-worker batch of 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    final_epochs: int = 3  # reported error = median over these last epochs
    augment: str = "auto"  # auto | none | crop-flip
    probe_size: int = 256  # images in the BN-noise probe set
    # for data from your files: resolved path, sizes and a content hash (cli._fingerprint), so that
    # changed files are a new recipe; empty for the named data sets (and then left out of the hash)
    data_fingerprint: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["data_fingerprint"]:
            del d["data_fingerprint"]  # recipes of named data sets keep the hashes they always had
        return d


@dataclass(frozen=True)
class Run:
    norm: str
    batch: int  # per worker
    seed: int
    sampling: str = "iid"  # iid | class

    @property
    def name(self) -> str:
        return f"{self.norm}-n{self.batch}-s{self.seed}-{self.sampling}"


@dataclass
class Dist:
    """Where this process sits: one process with virtual workers, or one DDP rank."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Join the process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return cls(rank, world, torch.device("cuda", local))
        return cls(rank, world, torch.device("cpu"))

    @staticmethod
    def leave() -> None:
        """Leave the process group (after a barrier) and free what held it now, not at exit.
        Left to the interpreter's shutdown, rank 0 aborted in about 1 of 10 torchrun runs here
        ("terminate called without an active exception" after its last line, torch 2.13, gloo), and
        torchrun then reports the job failed; with the collection done here, none did
        (`python scripts/spot_checks.py ddp-exit 20` counts both endings)."""
        import gc

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        gc.collect()


# ----------------------------------------------------------------------------- data order

def epoch_order(labels: torch.Tensor, seed: int, epoch: int, workers: int, batch: int, sampling: str) -> torch.Tensor:
    """Global batches of epoch ``epoch`` as a (steps, workers * batch) index tensor.

    Row s is global step s; its k-th chunk of ``batch`` indices is worker k's batch.
    ``iid``: a random permutation cut into batches (the last partial batch dropped).
    ``class``: each worker's batch comes from one class (every class shuffled and cut into
    chunks of ``batch``, the chunks shuffled and dealt to the workers).
    """
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    size = workers * batch
    if sampling == "iid":
        perm = torch.randperm(len(labels), generator=g)
        steps = len(perm) // size
        return perm[: steps * size].view(steps, size)
    if sampling != "class":
        raise ValueError(f"unknown worker sampling {sampling!r}; choose iid or class")
    chunks = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = len(idx) // batch
        chunks.append(idx[: k * batch].view(k, batch))
    chunks = torch.cat(chunks)
    chunks = chunks[torch.randperm(len(chunks), generator=g)]
    steps = len(chunks) // workers
    return chunks[: steps * workers].reshape(steps, size)


def epoch_augmentation(seed: int, epoch: int, steps: int, size: int, pad: int = 4):
    """Random crop offsets and flips for every image slot of the epoch's global batches."""
    g = torch.Generator().manual_seed(7_000_003 * seed + epoch + 1)
    dy = torch.randint(0, 2 * pad + 1, (steps, size), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (steps, size), generator=g)
    flip = torch.rand(steps, size, generator=g) < 0.5
    return dy, dx, flip


def learning_rate(recipe: Recipe, batch: int, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear scaling (lr x batch/32), linear warm-up, then cosine decay to zero."""
    peak = recipe.lr * batch / 32
    warmup = recipe.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- measurements

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, chunk: int = 1000) -> tuple[float, float]:
    """(error %, mean loss) in eval mode."""
    model.eval()
    wrong, loss = 0, 0.0
    for i in range(0, len(y), chunk):
        out = model(to_float(x[i : i + chunk], mean, std))
        wrong += (out.argmax(1) != y[i : i + chunk]).sum().item()
        loss += F.cross_entropy(out, y[i : i + chunk], reduction="sum").item()
    return 100.0 * wrong / len(y), loss / len(y)


def probe_indices(labels: torch.Tensor, size: int, batch: int, sampling: str) -> torch.Tensor:
    """Training images for the BN-noise probe, ordered so that its consecutive chunks of ``batch``
    are batches like the run's workers get: ``iid``, ``size`` random images; ``class``, per class a
    random multiple of ``batch`` of its images (about size / classes, at least ``batch``), cut into
    one-class chunks of ``batch`` that are then shuffled, as epoch_order deals them to workers (so
    W consecutive chunks, SyncBN's statistics batch, mix classes as a global batch does)."""
    g = torch.Generator().manual_seed(12345)
    if sampling == "iid":
        return torch.randperm(len(labels), generator=g)[:size]
    classes = torch.unique(labels)
    per_class = max(batch, size // len(classes) // batch * batch)
    chunks = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        idx = idx[: min(per_class, len(idx) // batch * batch)]
        chunks.append(idx.view(-1, batch))
    chunks = torch.cat(chunks)
    return chunks[torch.randperm(len(chunks), generator=g)].flatten()


@torch.no_grad()
def batch_stat_noise(model: nn.Module, probe: torch.Tensor, batch: int, eps: float = 1e-5) -> list[dict]:
    """Per norm layer: how far the batch statistics a norm trains with stray from the population's.

    The model runs in eval mode on the fixed probe set; at each norm layer's input the
    population mean/variance per channel are taken over the whole probe, and the batch ones over
    each chunk of ``batch`` probe images (the caller's statistics batch: N for BN, W x N for SyncBN;
    probe_indices orders the probe like the run's batches). Reported: mean over chunks and channels of
    |mu_B - mu| / sigma and |var_B - var| / var (relative errors of the mean and variance).
    """
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for _, m in norm_layers(model)]
    try:
        model.eval()
        model(probe)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for (name, _), a in zip(norm_layers(model), inputs):
        p, c = a.shape[:2]
        k = p // batch
        if k == 0:  # fewer probe images than one batch: nothing to measure
            return []
        var, mu = torch.var_mean(a, dim=(0, 2, 3), correction=0)
        chunks = a[: k * batch].reshape(k, batch, c, -1)
        var_b, mu_b = torch.var_mean(chunks, dim=(1, 3), correction=0)
        out.append({
            "layer": name,
            "mean_rel_err": ((mu_b - mu).abs() / (var + eps).sqrt()).mean().item(),
            "var_rel_err": ((var_b - var).abs() / (var + eps)).mean().item(),
        })
    return out


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of tensors autograd saves for the backward in one training forward on ``x``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    was_training = model.training
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    model.load_state_dict(state, strict=False)  # the measuring step must not move running stats
    model.train(was_training)
    return total


def max_rss_bytes() -> int:
    """High-water resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file, fsync, then rename over ``path``: never a torn file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: str, d: Dist):
    """Rank 0 reads the checkpoint and every rank gets the same object (works across nodes)."""
    blob = None
    if d.is_main and path and os.path.exists(path):
        with open(path, "rb") as f:
            blob = f.read()
    if d.distributed:
        box = [blob]
        dist.broadcast_object_list(box, src=0)
        blob = box[0]
    return None if blob is None else torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def _average_running_stats(model: nn.Module, d: Dist) -> None:
    """Under DDP each worker keeps its own BN running statistics; average them across workers,
    which is what the virtual-worker BN keeps (the EMA is linear, so the two agree)."""
    if not d.distributed:
        return
    for m in model.modules():
        if isinstance(m, WorkerBatchNorm2d) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(d.world)


# ----------------------------------------------------------------------------- the run


def _ddp(model: nn.Module) -> nn.Module:
    """DDP without broadcasting rank 0's buffers every forward: BN's running statistics are kept per
    worker while training, as the paper's per-GPU BN, and averaged before evaluation. torch 2.13
    deprecates ``broadcast_buffers`` for ``forward_sync_buffers`` (which still syncs once at
    construction, as every rank starts from the same model anyway); older torch has only the first."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(model, **{flag: False})


def train_run(recipe: Recipe, run: Run, ds: DataSet, checkpoint: str | None = None, progress=None,
              d: Dist | None = None, max_steps: int | None = None) -> list[dict]:
    """Train one run and return its per-epoch records (resuming from ``checkpoint`` if present).

    ``progress(event, **info)`` is called with ``"step"`` and ``"epoch"`` events.
    ``max_steps`` stops after that many steps (tests) and returns the per-step losses instead.
    """
    d = d or Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if d.distributed and d.world != recipe.workers:
        raise ValueError(f"launched {d.world} processes but the recipe has workers={recipe.workers}; "
                         f"pass --workers {d.world} (one process per worker)")
    dev, W, N = d.device, recipe.workers, run.batch
    augment = recipe.augment == "crop-flip" or (recipe.augment == "auto" and ds.augment)

    torch.manual_seed(run.seed)
    c, h, w = ds.shape
    model = build_model(recipe.model, run.norm, in_channels=c, num_classes=ds.num_classes, image_size=h,
                        workers=W, distributed=d.distributed, width=recipe.width, blocks=recipe.blocks,
                        stem_stride=recipe.stem_stride,
                        groups=recipe.groups, min_group_channels=recipe.min_group_channels).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, foreach=True)  # CPU too: one call, not a loop
    mean, std = channel_stats(ds.train_x)
    mean, std = mean.to(dev), std.to(dev)
    train_x, train_y = ds.train_x.to(dev), ds.train_y.to(dev)
    val_x, val_y = ds.val_x.to(dev), ds.val_y.to(dev)
    probe_idx = probe_indices(ds.train_y, recipe.probe_size, N, run.sampling)
    probe = to_float(train_x[probe_idx.to(dev)], mean, std)

    steps_per_epoch = len(ds.train_y) // (W * N)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(ds.train_y)} training images make no global batch of {W} x {N}")
    total_steps = steps_per_epoch * recipe.epochs
    history: list[dict] = []
    start_epoch = 0
    state = _load_checkpoint(checkpoint, d) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]

    net = _ddp(model) if d.distributed else model
    held = N if d.distributed else W * N  # images this process holds per step
    saved = saved_activation_bytes(model, to_float(train_x[:held], mean, std), train_y[:held])
    mem = {"saved_activation_bytes_per_worker": saved // (held // N)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = max_rss_bytes()
    step_losses = []

    for epoch in range(start_epoch, recipe.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        order = epoch_order(ds.train_y, run.seed, epoch, W, N, run.sampling)
        if augment:
            dys, dxs, flips = epoch_augmentation(run.seed, epoch, len(order), W * N)
        net.train()
        loss_sum = torch.zeros((), device=dev)
        wrong = torch.zeros((), device=dev, dtype=torch.long)
        for step in range(len(order)):
            mine = slice(d.rank * N, (d.rank + 1) * N) if d.distributed else slice(None)
            idx = order[step, mine].to(dev)
            x, y = to_float(train_x[idx], mean, std), train_y[idx]
            if augment:
                x = apply_crop_flip(x, dys[step, mine], dxs[step, mine], flips[step, mine])
            lr = learning_rate(recipe, N, epoch * steps_per_epoch + step, total_steps, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr

            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            loss_sum += loss.detach()
            wrong += (logits.detach().argmax(1) != y).sum()
            if max_steps is not None:
                step_losses.append(loss.detach().clone())
                if len(step_losses) >= max_steps:
                    break
            if progress is not None:
                progress("step", step=step + 1, steps=len(order), epoch=epoch + 1, epochs=recipe.epochs)
        if max_steps is not None:
            break

        # end of epoch: one record (globally averaged under DDP), then a checkpoint
        if d.distributed:
            dist.all_reduce(loss_sum)
            dist.all_reduce(wrong)
            loss_sum /= d.world
        _average_running_stats(model, d)
        val_err, val_loss = evaluate(model, val_x, val_y, mean, std)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / len(order),
            "train_error": 100.0 * wrong.item() / (len(order) * W * N),
            "val_error": val_err,
            "val_loss": val_loss,
            "lr_peak": recipe.lr * N / 32,
            "steps": len(order),
            "epoch_seconds": time.perf_counter() - t0,
            "epoch_cpu_seconds": time.process_time() - c0,
            "max_rss_bytes": max_rss_bytes(),
            "rss_growth_bytes": max_rss_bytes() - rss0,
            **mem,
        }
        if dev.type == "cuda":
            record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        probe_epochs = {1, max(1, recipe.epochs // 2), recipe.epochs}
        if run.norm in BATCH_NORMS and epoch + 1 in probe_epochs:
            # BN normalizes with each worker's N images, SyncBN with the global batch's W x N
            record["bn_noise"] = batch_stat_noise(model, probe, W * N if run.norm == "syncbn" else N)
            record["bn_noise_probe"] = run.sampling  # untagged records: iid chunks of N for every run
        history.append(record)
        if checkpoint and d.is_main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "history": history}, checkpoint)
        if progress is not None:
            progress("epoch", epoch=epoch + 1, epochs=recipe.epochs, record=record, history=history)
    if max_steps is not None:
        losses = torch.stack(step_losses)
        if d.distributed:
            dist.all_reduce(losses)
            losses /= d.world
        return [{"step_losses": losses.tolist()}]
    return history

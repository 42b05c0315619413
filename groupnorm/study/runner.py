"""The grid of runs: record store, resume, the output-folder lock, parallel jobs, progress bars.

Layout of the output folder::

    OUT/.lock                              held while a study writes here (pid, host, start time)
    OUT/recipe-<hash>.json                 the shared recipe behind <hash>
    OUT/runs/<hash>/<run>/checkpoint.pt    model + optimizer + history after the last finished epoch
    OUT/runs/<hash>/<run>/records.jsonl    one JSON line per finished epoch of that run
    OUT/runs/<hash>/<run>/done.json        written last: the run is finished
    OUT/records.jsonl                      every record of every run in the folder (rebuilt)

Every file is written to a temporary name and renamed into place, so a study killed at any
moment (kill -9 included) leaves only whole files; the same command resumes it, skipping
finished runs and continuing unfinished ones from their last checkpoint. The recipe hash is part
of every record's key, so studies with different recipes never mix, even in one folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import signal
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing.managers import SyncManager
from dataclasses import dataclass
from pathlib import Path

import torch

from groupnorm.files import write_atomic
from groupnorm.study import data as data_mod
from groupnorm.study.train import Dist, Recipe, Run, train_run


def recipe_hash(recipe: Recipe) -> str:
    d = recipe.to_dict()
    # final_epochs is how the table reads the records (the median of the last ones), not how they
    # were trained: runs are shared across --final-epochs, hashed with the default's value (so the
    # hashes of default recipes are the ones they always had)
    d["final_epochs"] = Recipe.final_epochs
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- the lock

class StudyLocked(RuntimeError):
    pass


class FolderLock:
    """An exclusive lock on an output folder: a file created with O_EXCL holding pid and host.

    A lock left by a dead process on this host (kill -9, power loss) is detected by its pid and
    taken over; a live one is refused with a message naming the holder.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FolderLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written right now, or garbage: look again shortly
                    time.sleep(0.2)
                    holder = self._holder()
                if holder and holder.get("host") == me["host"] and not _alive(holder.get("pid", -1)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
                       f"{holder.get('command')}") if holder else "unreadable lock file"
                raise StudyLocked(
                    f"another study is writing to {self.path.parent} ({who}).\n"
                    f"Wait for it to finish, or pass another --out. If you are sure no study is running "
                    f"there, delete {self.path}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StudyLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- one run, in any process

_DATA_CACHE: dict = {}


def load_data(recipe: Recipe, quiet: bool = True) -> data_mod.DataSet:
    key = (recipe.data, recipe.train_size, recipe.val_size, recipe.image_size)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data_mod.load(
            None if recipe.data == "default" else recipe.data,
            train_size=recipe.train_size or None, val_size=recipe.val_size or None,
            image_size=recipe.image_size, quiet=quiet)
    return _DATA_CACHE[key]


def run_dir(out: Path, recipe: Recipe, run: Run) -> Path:
    return Path(out) / "runs" / recipe_hash(recipe) / run.name


def run_records(recipe: Recipe, run: Run, history: list[dict]) -> list[dict]:
    key = {"config": recipe_hash(recipe), "norm": run.norm, "batch": run.batch, "seed": run.seed,
           "sampling": run.sampling, "workers": recipe.workers}
    return [{**key, **rec} for rec in history]


def execute_run(recipe: Recipe, run: Run, out: Path, report=None, d: Dist | None = None) -> dict:
    """Train one run with checkpoint/resume and write its records; returns the done summary."""
    d = d or Dist.from_env()
    folder = run_dir(out, recipe, run)
    if d.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    ds = load_data(recipe)
    last = [0.0]

    def progress(event, **info):
        if event == "epoch" and d.is_main:
            write_atomic(folder / "records.jsonl",
                         "".join(json.dumps(r) + "\n" for r in run_records(recipe, run, info["history"])))
        if report is None:
            return
        now = time.monotonic()
        if event == "step" and now - last[0] < 0.25 and info["step"] != info["steps"]:
            return
        last[0] = now
        report({"run": run.name, "event": event, **{k: v for k, v in info.items() if k != "history"}})

    t0 = time.perf_counter()
    history = train_run(recipe, run, ds, checkpoint=str(folder / "checkpoint.pt"), progress=progress, d=d)
    summary = {"run": run.name, "epochs": len(history), "seconds": time.perf_counter() - t0,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if d.is_main:
        write_atomic(folder / "done.json", json.dumps(summary))
        (folder / "checkpoint.pt").unlink(missing_ok=True)  # records hold all results; weights can be big
    return summary


def set_threads(threads: int) -> None:
    """Give this process ``threads`` intra-op threads, for torch and for numba's parallel kernels
    (left at their defaults, both pools claim every core and parallel jobs oversubscribe the CPU)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))  # sizes numba's pool if not yet started
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency, but the study does not need it
        pass


def _job(recipe: Recipe, run: Run, out: str, queue, threads: int) -> dict:
    set_threads(threads)
    return execute_run(recipe, run, Path(out), report=queue.put)


# ----------------------------------------------------------------------------- the grid

@dataclass
class Study:
    recipe: Recipe
    runs: list[Run]
    out: Path

    @property
    def hash(self) -> str:
        return recipe_hash(self.recipe)

    def is_done(self, run: Run) -> bool:
        return (run_dir(self.out, self.recipe, run) / "done.json").exists()

    def epochs_done(self, run: Run) -> int:
        path = run_dir(self.out, self.recipe, run) / "records.jsonl"
        try:
            return len(path.read_text().splitlines())
        except OSError:
            return 0

    def todo(self, resume: bool = True) -> list[Run]:
        """The runs still to train: every run without ``resume``, else those not done."""
        return [r for r in self.runs if not (resume and self.is_done(r))]

    def forget(self) -> None:
        """--no-resume: remove this recipe's runs of the grid (other recipes' stay)."""
        for run in self.runs:
            shutil.rmtree(run_dir(self.out, self.recipe, run), ignore_errors=True)

    def collect(self) -> list[dict]:
        """All per-epoch records in the folder (every recipe); rewrites OUT/records.jsonl."""
        records = []
        for path in sorted(Path(self.out).glob("runs/*/*/records.jsonl")):
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        write_atomic(Path(self.out) / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return records

    def run(self, jobs: int = 1, resume: bool = True, progress: bool = True, threads: int = 0) -> float:
        """Run every unfinished run of the grid; returns the wall time in seconds.

        ``threads`` per job (torch and numba); 0: the cores divided among the jobs (or ranks).
        """
        d = Dist.from_env()
        self.out.mkdir(parents=True, exist_ok=True)
        if d.is_main:
            write_atomic(self.out / f"recipe-{self.hash}.json", json.dumps(self.recipe.to_dict(), indent=1))
            if not resume:
                self.forget()
        todo = self.todo()
        if d.distributed:  # rank 0's view of the folder decides, for every node
            box = [todo]
            torch.distributed.broadcast_object_list(box, src=0)
            todo = box[0]
        if d.is_main and not todo:
            print(f"all {len(self.runs)} run(s) of recipe {self.hash} are already done in {self.out}/: "
                  "reading their results (--no-resume trains them again)", file=sys.stderr, flush=True)
        elif d.is_main:
            done, started = len(self.runs) - len(todo), sum(1 for r in todo if self.epochs_done(r))
            if done or started:
                print(f"resuming: {done} of {len(self.runs)} runs already done in {self.out}/"
                      + (f", {started} more continue from their last finished epoch" if started else ""),
                      file=sys.stderr, flush=True)
        jobs = min(jobs, len(todo))  # a job per run at most: the cores are divided among the jobs that run
        t0 = time.perf_counter()
        bars = _Bars(self, todo, jobs, enabled=progress and d.is_main, main=d.is_main)
        try:
            if d.distributed or jobs <= 1 or len(todo) <= 1:
                set_threads(threads or max(1, cpu_count() // (d.world if d.distributed else 1)))
                for run in todo:
                    bars.start(run.name)
                    execute_run(self.recipe, run, self.out, report=bars.update, d=d)
            else:
                self._run_parallel(todo, jobs, bars, threads)
        finally:
            bars.close()
        return time.perf_counter() - t0

    def _run_parallel(self, todo: list[Run], jobs: int, bars: "_Bars", threads: int = 0) -> None:
        threads = threads or max(1, cpu_count() // jobs)
        os.environ["NUMBA_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
        manager = SyncManager(ctx=ctx)
        manager.start(_child_init, (os.getpid(),))
        try:
            queue = manager.Queue()
            pump = threading.Thread(target=_pump, args=(queue, bars), daemon=True)
            pump.start()
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_child_init,
                                       initargs=(os.getpid(),))
            try:
                futures = [pool.submit(_job, self.recipe, run, str(self.out), queue, threads) for run in todo]
                for fut in as_completed(futures):
                    fut.result()  # re-raise a failed run's exception here
            except BaseException:
                # Ctrl-C (the workers ignore it) or a failed run: stop now, not after every queued run
                # has trained (the pool's own exit would wait for them); each run resumes from its last
                # finished epoch
                workers = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for w in workers:
                    w.terminate()
                for w in workers:
                    w.join(timeout=10)
                raise
            else:
                pool.shutdown()
            finally:
                queue.put(None)
                pump.join(timeout=5)
        finally:
            manager.shutdown()


def _child_init(parent: int) -> None:
    """In the study's worker and manager processes: leave Ctrl-C to the study process (which stops
    them), and die with it (a kill -9 of it must not leave them training, and a rerun would
    otherwise take the lock and train the same runs beside them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the old behaviour
            pass
    if os.getppid() != parent:  # the study process died before prctl took effect
        os._exit(1)


def _pump(queue, bars) -> None:
    while True:
        msg = queue.get()
        if msg is None:
            return
        bars.update(msg)


class _Bars:
    """One tqdm bar over the whole study (in epochs, with ETA) and one per running run (in steps).
    Without a terminal (a log file, nohup, CI) or with --no-progress: one line per finished run
    instead (tqdm's redraws would fill a log with carriage returns), and between them a line per
    finished epoch at most every HEARTBEAT_S seconds, so a log shows the study alive long before
    its first (longest, N = 1) runs end."""

    HEARTBEAT_S = 60.0

    def __init__(self, study: Study, todo: list[Run], jobs: int, enabled: bool = True, main: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.lines = main and not self.enabled
        self.lock = threading.Lock()
        self.per_run: dict[str, object] = {}
        self.slots = list(range(1, max(1, jobs) + 1))
        self.runs_total, self.runs_done, self.t0 = len(study.runs), len(study.runs) - len(todo), time.perf_counter()
        self.last_line = self.t0
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.tqdm = tqdm
        epochs = study.recipe.epochs
        total = epochs * len(study.runs)
        done = total - sum(epochs - study.epochs_done(r) for r in todo)
        self.total = tqdm(total=total, initial=done, desc=f"study {study.hash}", unit="epoch", position=0,
                          dynamic_ncols=True, smoothing=0.05)

    def start(self, name: str) -> None:
        pass

    def update(self, msg: dict) -> None:
        if not self.enabled:
            if self.lines and msg["event"] == "epoch":
                with self.lock:
                    now = time.perf_counter()
                    last = msg["epoch"] == msg["epochs"]
                    if not last and now - self.last_line < self.HEARTBEAT_S:
                        return
                    self.runs_done += last
                    what = "done" if last else f"epoch {msg['epoch']}/{msg['epochs']}"
                    tail = f" at its last epoch ({msg['epoch']})" if last else ""
                    print(f"[{self.runs_done}/{self.runs_total} runs, {(now - self.t0) / 60:.1f} min] "
                          f"{msg['run']} {what}: val error {msg['record']['val_error']:.1f}%{tail}",
                          file=sys.stderr, flush=True)
                    self.last_line = now
            return
        with self.lock:
            name = msg["run"]
            bar = self.per_run.get(name)
            step = msg["event"] == "step"
            total = msg["steps"] * msg["epochs"] if step else 1
            done = (msg["epoch"] - 1) * msg["steps"] + msg["step"] if step else 0
            if bar is None:
                slot = self.slots.pop(0) if self.slots else len(self.per_run) + 1
                # a resumed run starts at its first step not yet done: tqdm leaves `initial` out of the rate
                bar = self.tqdm(total=total, initial=max(0, done - 1), desc=f"  {name}", unit="step", position=slot,
                                leave=False, dynamic_ncols=True)
                bar.slot = slot
                self.per_run[name] = bar
            if step:
                bar.total = total
                bar.set_postfix_str(f"epoch {msg['epoch']}/{msg['epochs']}", refresh=False)
                bar.update(done - bar.n)
            elif msg["event"] == "epoch":
                rec = msg["record"]
                self.total.update(1)
                self.total.set_postfix_str(f"last: {name} ep{msg['epoch']} val {rec['val_error']:.1f}%")
                if msg["epoch"] == msg["epochs"]:
                    bar.close()
                    self.slots.append(bar.slot)
                    self.slots.sort()
                    del self.per_run[name]

    def close(self) -> None:
        if self.enabled:
            for bar in self.per_run.values():
                bar.close()
            self.total.close()

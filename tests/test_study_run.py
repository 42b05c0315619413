"""A tiny study end to end: records, table, figure, verdict; resume after kill -9; the lock."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from groupnorm.study import cli, runner
from groupnorm.study.runner import FolderLock, StudyLocked

sys.path.insert(0, str(Path(__file__).parent))
from test_study_data import make_idx_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--norms", "bn,gn", "--batch-sizes", "4,2", "--workers", "2",
            "--epochs", "2", "--seeds", "2", "--width", "8", "--min-group-channels", "4", "--jobs", "1",
            "--threads", "1", "--no-progress", *extra]


def read_records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, capsys):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    out = tmp_path / "out"
    assert cli.run(tiny_args(data, out)) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # no terminal (--no-progress here): one line per finished run, not tqdm's redraws
    assert captured.err.count("done: val error") == 8 and "[8/8 runs," in captured.err
    records = read_records(out)
    assert len(records) == 2 * 2 * 2 * 2  # norms x batches x seeds x epochs
    keys = {(r["config"], r["norm"], r["batch"], r["seed"], r["sampling"], r["epoch"]) for r in records}
    assert len(keys) == len(records)
    for r in records:
        assert {"train_loss", "train_error", "val_error", "val_loss", "epoch_seconds", "max_rss_bytes",
                "saved_activation_bytes_per_worker"} <= set(r)
    assert any("bn_noise" in r for r in records if r["norm"] == "bn")
    assert not any("bn_noise" in r for r in records if r["norm"] == "gn")
    summary = (out / "summary.md").read_text()
    assert "| bn |" in summary and "| gn |" in summary and "N = 4" in summary and "±" in summary
    # the recipe line leaves out --image-size, which only image folders use (these are 28 px IDX images)
    assert "min_group_channels=4" in summary and "image_size" not in summary
    assert (out / "figure.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    assert ("Verdict: BN's error grows by" in printed or "Verdict: BN's error falls by" in printed)
    assert "GN's varies by" in printed
    assert not (out / ".lock").exists()

    # a second recipe in the same folder never mixes with the first; both worker-sampling regimes
    assert cli.run(tiny_args(data, out, "--lr", "0.05", "--seeds", "1", "--worker-sampling", "iid,class",
                             "--min-group-size", "2")) == 0  # the library's name for --min-group-channels
    records2 = read_records(out)
    assert len({r["config"] for r in records2}) == 2
    assert "also holds 1 other recipe(s)" in capsys.readouterr().out
    assert len(records2) == len(records) + 2 * 2 * 2 * 2
    summary2 = (out / "summary.md").read_text()
    assert "min_group_channels=2" in summary2
    assert "(1 seeds)" in summary2 and "±" not in summary2.split("Verdict")[0].split("N = images per worker")[1]
    assert "| bn (class-sorted workers) |" in summary2 and "Verdict (class-sorted workers)" in summary2

    # everything finished: the same command trains nothing and gives the same table
    t0 = time.time()
    assert cli.run(tiny_args(data, out)) == 0
    assert time.time() - t0 < 30
    assert len(read_records(out)) == len(records2)


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    data = make_idx_folder(tmp_path / "data", n_train=200, n_val=20)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "groupnorm.study.cli", *tiny_args(data, out, "--epochs", "4", "--seeds", "1")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill -9 once the first run has a finished epoch (a checkpoint) but the study is not done
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("runs/*/*/checkpoint.pt")):
            time.sleep(0.1)
        assert proc.poll() is None, "the study finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / ".lock").exists()  # left behind by the killed study: stale, to be taken over
    partial = list(out.glob("runs/*/*/records.jsonl"))
    assert partial and len(list(out.glob("runs/*/*/done.json"))) < 4, "the kill should land in the middle of the study"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    records = read_records(out)
    keys = [(r["norm"], r["batch"], r["seed"], r["epoch"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * 2 * 4  # no duplicates, nothing missing
    assert len(list(out.glob("runs/*/*/done.json"))) == 4
    assert not list(out.glob("runs/*/*/checkpoint.pt"))


@pytest.mark.slow
def test_study_under_torchrun_takes_its_workers_from_the_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m groupnorm study ...` without --workers: two real gloo
    processes, W = 2 (it had to be given, or the study stopped on the default 8), and every
    run's records and the summary are written."""
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    out = tmp_path / "out"
    args = tiny_args(data, out, "--seeds", "1", "--epochs", "1")
    i = args.index("--workers")
    del args[i:i + 2]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "groupnorm", "study", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 workers" in proc.stdout
    recipe = json.loads(next(out.glob("recipe-*.json")).read_text())
    assert recipe["workers"] == 2
    records = read_records(out)
    assert {(r["norm"], r["batch"]) for r in records} == {("bn", 4), ("bn", 2), ("gn", 4), ("gn", 2)}
    assert (out / "summary.md").exists()


def _group_alive(pgid: int) -> list[str]:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()


@pytest.mark.slow
def test_parallel_study_stops_on_ctrl_c_and_dies_with_its_process(tmp_path):
    """Found in review: with --jobs 2, Ctrl-C was taken by each pool worker as a failed run (the study
    went on training every queued run), and kill -9 of the study left its workers training, so a
    rerun took the lock and trained the same runs beside them. A plain kill (SIGTERM) ended the
    study with a leaked-semaphore warning, its lock left behind and no resume hint (a user's audit)."""
    data = make_idx_folder(tmp_path / "data", n_train=400, n_val=20)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    for how in ("ctrl-c", "kill", "kill -9"):
        out = tmp_path / how.replace(" ", "")
        args = tiny_args(data, out, "--epochs", "6", "--seeds", "2").copy()
        args[args.index("--jobs") + 1] = "2"
        # SIGINT back to its default in the child: a suite started in the background (`cmd &`) inherits
        # it ignored, and Python then installs no Ctrl-C handler (found when CI was run that way)
        proc = subprocess.Popen([sys.executable, "-m", "groupnorm.study.cli", *args], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 180
            while time.time() < deadline and not list(out.glob("runs/*/*/checkpoint.pt")):
                time.sleep(0.1)
            assert proc.poll() is None, "the study finished before the signal"
            t0 = time.time()
            if how == "ctrl-c":  # what a terminal sends: SIGINT to the whole process group
                os.killpg(proc.pid, signal.SIGINT)
                assert proc.wait(timeout=60) == 130
                assert time.time() - t0 < 30
                assert "interrupted; run the same command to resume" in proc.stderr.read()
            elif how == "kill":  # SIGTERM to the study process alone (kill, timeout, a scheduler)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 128 + signal.SIGTERM
                assert time.time() - t0 < 30
                err = proc.stderr.read()
                assert "terminated (SIGTERM); run the same command to resume" in err
                assert "leaked semaphore" not in err
                assert not (out / ".lock").exists(), "SIGTERM should release the folder lock"
            else:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and _group_alive(proc.pid):
                time.sleep(0.2)
            assert not _group_alive(proc.pid), f"{how}: processes left behind"
            assert len(list(out.glob("runs/*/*/done.json"))) < 8  # it really stopped early
        finally:
            for pid in _group_alive(proc.pid):
                os.kill(int(pid), signal.SIGKILL)


def test_lock_refuses_a_second_study(tmp_path, capsys):
    with FolderLock(tmp_path):
        with pytest.raises(StudyLocked, match=f"another study is writing to {tmp_path}.*pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
        data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
        assert cli.run(tiny_args(data, tmp_path)) == 3
        assert "another study is writing" in capsys.readouterr().err
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    lock = FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    assert cli.run(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o" / "new"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing: no such file or folder" in err and "expected one of" in err
    assert not (tmp_path / "o").exists()  # a failed start leaves no empty --out folder behind


def test_unwritable_out_is_a_clear_error_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for out, why in ((blocker, "it is a file, not a directory"), (blocker / "sub", "cannot write the study"),
                     (dangling, "is a broken symbolic link"), (dangling / "sub", "is a broken symbolic link")):
        assert cli.run(["--quick", "--out", str(out), "--no-progress"]) == 2
        captured = capsys.readouterr()
        assert why in captured.err and "give a directory you can write to" in captured.err
        assert "runs (" not in captured.out  # failed before loading data or planning runs
    # a folder mkdir refuses although the checks before it pass (as root, /proc looks writable)
    assert cli.run(["--quick", "--out", "/proc/groupnorm-test-out", "--no-progress"]) == 2
    assert "give a directory you can write to" in capsys.readouterr().err


def test_help_shows_defaults():
    proc = subprocess.run([sys.executable, "-m", "groupnorm.study.cli", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
    assert "--batch-sizes" in proc.stdout and "(default: 32,16,8,4,2,1)" in proc.stdout.replace("\n", " ").replace("  ", " ")


def test_bad_numbers_and_settings_are_clear_errors_before_any_work(tmp_path, capsys):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    for flag, value in [("--width", "0"), ("--groups", "0"), ("--min-group-channels", "0"), ("--threads", "-1"),
                        ("--train-size", "-5"), ("--lr", "0"), ("--lr", "nan"), ("--final-epochs", "0"),
                        ("--jobs", "-1"), ("--blocks", "0"), ("--val-size", "-1")]:
        with pytest.raises(SystemExit) as e:
            cli.run(tiny_args(data, tmp_path / "o", flag, value))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and ": expected" in err  # --min-group-channels/--min-group-size: ...
    with pytest.raises(SystemExit):  # no abbreviations: --quick must see every flag it should not override
        cli.run(["--quick", "--epoch", "1", "--out", str(tmp_path / "o")])
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err
    # class-sorted workers need N images of one class per worker batch: 20 per class cannot make N = 32
    assert cli.run(tiny_args(data, tmp_path / "o", "--worker-sampling", "class", "--batch-sizes", "32")) == 2
    assert "do not fill one global step" in capsys.readouterr().err


def test_changed_data_files_are_a_new_recipe(tmp_path, capsys):
    """Found in review: the recipe held --data as typed, so new files under the same path reused the
    old results (and the table described data it was not trained on)."""
    from groupnorm.study import runner
    from groupnorm.study.runner import recipe_hash
    from groupnorm.study.train import Recipe

    assert recipe_hash(Recipe(data="fashion-mnist")) == recipe_hash(Recipe(data="fashion-mnist", data_fingerprint=""))
    # named data sets keep the hashes they had before the field existed (the README's default: a9dca8bfae)
    assert "data_fingerprint" not in Recipe(data="fashion-mnist").to_dict()
    assert recipe_hash(Recipe(data="fashion-mnist")) != recipe_hash(Recipe(data="fashion-mnist", data_fingerprint="x"))
    out = tmp_path / "out"
    args = ["--norms", "gn", "--batch-sizes", "2", "--epochs", "1", "--seeds", "1"]
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    assert cli.run(tiny_args(data, out, *args)) == 0
    first = {r["config"] for r in read_records(out)}
    make_idx_folder(tmp_path / "data", n_train=80, n_val=20)  # the same path, other files
    runner._DATA_CACHE.clear()  # a new process would read the files again; this one keeps them in memory
    assert cli.run(tiny_args(data, out, *args)) == 0
    assert len({r["config"] for r in read_records(out)} - first) == 1
    assert str(data.resolve()) in (out / "summary.md").read_text()


def test_bn_noise_probe_follows_the_worker_sampling():
    """Found in session 8: class-sorted runs were probed with random (iid) chunks, so the figure's
    BN-noise line for them showed the noise of batches those workers never saw."""
    import torch
    from torch import nn

    from groupnorm.study.train import batch_stat_noise, probe_indices

    labels = torch.arange(4).repeat_interleave(50)[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    iid = probe_indices(labels, 64, 8, "iid")
    assert len(iid) == 64 and len(set(iid.tolist())) == 64
    cls = probe_indices(labels, 64, 8, "class")
    assert len(cls) == 64  # 16 per class: 64 // 4 rounded down to a multiple of 8
    assert all(len(set(labels[chunk].tolist())) == 1 for chunk in cls.view(-1, 8))
    # shuffled one-class chunks: SyncBN's statistics batch (W = 4 chunks) mixes classes, as training's does
    assert any(len(set(labels[chunk].tolist())) > 1 for chunk in cls.view(-1, 32))
    assert len(probe_indices(labels, 64, 32, "class")) == 4 * 32  # at least one batch per class
    assert len(probe_indices(labels, 64, 64, "class")) == 0  # no class has 64 images

    # a BatchNorm right at the input, classes 10 apart: one-class chunks stray far from the population
    x = torch.randn(200, 1, 2, 2) + 10.0 * labels.view(-1, 1, 1, 1)
    model = nn.Sequential(nn.BatchNorm2d(1))
    iid_err = batch_stat_noise(model, x[iid], 8)[0]["mean_rel_err"]
    cls_err = batch_stat_noise(model, x[cls], 8)[0]["mean_rel_err"]
    assert cls_err > 0.5 > iid_err and cls_err > 3 * iid_err, (iid_err, cls_err)
    assert batch_stat_noise(model, x[cls], 32)[0]["mean_rel_err"] < cls_err  # SyncBN's W x N chunks
    assert batch_stat_noise(model, x[:4], 8) == []  # fewer images than a batch


def test_final_epochs_reads_the_same_runs(tmp_path, capsys):
    """--final-epochs only chooses how the table reads the records: changing it retrains nothing
    (found in session 6's notes: it was part of the recipe hash)."""
    from groupnorm.study.runner import recipe_hash
    from groupnorm.study.train import Recipe

    assert recipe_hash(Recipe(final_epochs=1)) == recipe_hash(Recipe())
    assert recipe_hash(Recipe(epochs=11)) != recipe_hash(Recipe())
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    out = tmp_path / "out"
    args = ["--norms", "gn", "--batch-sizes", "2", "--epochs", "3", "--seeds", "1"]
    assert cli.run(tiny_args(data, out, *args)) == 0
    first = read_records(out)
    capsys.readouterr()
    assert cli.run(tiny_args(data, out, *args, "--final-epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "done: val error" not in err  # nothing trained again
    assert "all 1 run(s) of recipe" in err and "already done" in err
    assert read_records(out) == first and len(first) == 3
    assert "median of the last 1 epochs" in (out / "summary.md").read_text()
    assert cli.run(tiny_args(data, out, *args, "--final-epochs", "4")) == 2  # more than --epochs 3
    assert "--final-epochs 4 is more than --epochs 3" in capsys.readouterr().err


def test_report_keeps_only_bn_noise_probed_like_the_run():
    """Records from before the probe followed the sampling and SyncBN's batch carry no tag: they
    count for BN's iid runs only."""
    from groupnorm.study.report import run_results

    def rec(norm, sampling, tag):
        r = {"config": "c", "norm": norm, "sampling": sampling, "batch": 2, "seed": 0, "epoch": 1, "val_error": 1.0,
             "train_error": 1.0, "epoch_seconds": 1.0, "bn_noise": [{"layer": "x", "mean_rel_err": 0.1, "var_rel_err": 0.2}]}
        if tag:
            r["bn_noise_probe"] = sampling
        return r

    untagged = {k[:2]: v["bn_noise"] is not None for k, v in run_results(
        [rec(n, s, False) for n in ("bn", "syncbn") for s in ("iid", "class")], "c", 1).items()}
    assert untagged == {("iid", "bn"): True, ("class", "bn"): False, ("iid", "syncbn"): False, ("class", "syncbn"): False}
    tagged = {k[:2]: v["bn_noise"] is not None for k, v in run_results(
        [rec(n, s, True) for n in ("bn", "syncbn") for s in ("iid", "class")], "c", 1).items()}
    assert all(tagged.values()) and len(tagged) == 4


def test_repeated_batch_sizes_are_one_run_each():
    assert cli._int_list("8,8,2, 8") == [8, 2]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from groupnorm.study import runner

    path = tmp_path / "done.json"
    runner.write_atomic(path, "old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runner.write_atomic(path, "new, longer text")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json"], "the temporary file was left behind"
    monkeypatch.undo()
    runner.write_atomic(path, "new")
    assert path.read_text() == "new"


def test_results_are_the_median_of_the_last_final_epochs():
    from groupnorm.study import report

    recs = [{"config": "c", "sampling": "iid", "norm": "gn", "batch": 4, "seed": 0, "epoch": e, "val_error": v,
             "train_error": v / 2, "epoch_seconds": 1.0} for e, v in ((1, 10.0), (2, 20.0), (3, 30.0))]
    key = ("iid", "gn", 4, 0)
    for final, expected in ((3, 20.0), (2, 25.0), (1, 30.0)):
        got = report.run_results(recs, "c", final, epochs=3)[key]
        assert got["val_error"] == expected and got["train_error"] == expected / 2, final
    assert report.run_results(recs[:2], "c", 1, epochs=3) == {}  # unfinished: left out
    assert report.run_results(recs[::-1], "c", 2, epochs=3)[key]["val_error"] == 25.0  # order of the file


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- runner: the lock

def test_lock_of_another_host_is_never_taken_over(tmp_path):
    """A lock written by a study on another host (shared filesystem) cannot be judged stale by a
    pid lookup here: it must be refused, even when that pid is free on this host."""
    (tmp_path / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname() + "-other",
                                                 "started": "x", "command": "c"}))
    with pytest.raises(StudyLocked, match="another study is writing"):
        FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["host"].endswith("-other")


def test_release_leaves_a_lock_that_another_process_now_holds(tmp_path):
    """release() removes the lock only while it still names this process (it may have been judged
    stale and taken over by another study meanwhile)."""
    lock = FolderLock(tmp_path).acquire()
    other = {"pid": os.getpid() + 1, "host": socket.gethostname(), "started": "x", "command": "c"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text()) == other


def test_pid_of_another_user_counts_as_alive(monkeypatch):
    """os.kill(pid, 0) -> PermissionError means the process exists (another user's): not stale."""
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runner.os, "kill", kill)
    assert runner._alive(4242) is True


def one_run_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--norms", "gn", "--batch-sizes", "2", "--workers", "2",
            "--epochs", "1", "--seeds", "1", "--width", "8", "--min-group-channels", "4", "--jobs", "1",
            "--threads", "1", "--no-progress", *extra]


def test_infinite_numbers_are_refused(tmp_path, capsys):
    """--lr inf (and --weight-decay inf) would train on NaNs: refused like nan."""
    for flag in ("--lr", "--weight-decay"):
        with pytest.raises(SystemExit) as e:
            cli.run(one_run_args(tmp_path / "d", tmp_path / "o", flag, "inf"))
        assert e.value.code == 2
        assert f"argument {flag}: expected" in capsys.readouterr().err


def test_quick_leaves_explicit_flags_alone():
    """--quick fills in only the flags not given (also in --flag=value form)."""
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = ["--quick", "--epochs", "2", "--norms=gn", "--seeds", "5"]
    args = p.parse_args(argv)
    cli._apply_quick(args, argv)
    assert (args.epochs, args.norms, args.seeds) == (2, ["gn"], 5)
    assert (args.workers, args.batch_sizes, args.train_size) == (4, [32, 4, 1], 3000)


@pytest.mark.parametrize(
    "changes, extra, world, message",
    [
        # the check uses the largest N: 64 images cannot make one step of 2 workers x 64
        ({"--batch-sizes": "64,2"}, (), 1, "fewer than one global batch (2 x 64 = 128)"),
        # a --train-size below one global batch: the message names the flag and the size that works
        ({"--batch-sizes": "4"}, ("--train-size", "5"), 1, "(--train-size 5: a class-stratified subset"),
        # 10 classes of 6-7 images at N = 4: 10 one-class batches, too few for 16 workers
        ({"--workers": "16", "--batch-sizes": "4"}, ("--worker-sampling", "class"), 1,
         "do not fill one global step of 16 such batches at N = 4"),
        # under torchrun each worker is a process: 2 processes with --workers 4
        ({"--workers": "4"}, (), 2, "torchrun started 2 processes but --workers is 4"),
    ],
    ids=["largest-global-batch", "train-size", "class-sampling", "torchrun-world"],
)
def test_a_grid_the_data_or_processes_cannot_feed_is_refused_up_front(changes, extra, world, message, tmp_path,
                                                                       capsys, monkeypatch):
    from groupnorm.study import train

    if world > 1:
        monkeypatch.setattr(train.Dist, "from_env", classmethod(lambda cls: cls(rank=0, world=world)))
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    args = one_run_args(data, tmp_path / "o", *extra)
    for flag, value in changes.items():
        args[args.index(flag) + 1] = value
    assert cli.run(args) == 2
    assert message in capsys.readouterr().err


def test_announcements_count_right_note_a_short_data_set_and_say_what_a_resume_found(tmp_path, capsys):
    """'1 epoch', '1 job' (not the --jobs asked for one run), a note when --train-size exceeds the data (and
    summary.md shows the size used), and a line on resuming with runs already done."""
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    out = tmp_path / "out"
    assert cli.run(one_run_args(data, out, "--jobs", "4", "--train-size", "1000")) == 0
    captured = capsys.readouterr()
    assert "1 run (gn x N=2 x 1 seed(s) x iid), 2 workers, 1 epoch, recipe " in captured.out
    assert ", 1 job, output " in captured.out
    assert "note: --train-size 1000 is more than the 64 train images of data; using all 64" in captured.err
    assert "resuming" not in captured.err
    assert "train_size=1000 (64 used)" in (out / "summary.md").read_text()
    assert cli.run(one_run_args(data, out, "--jobs", "4", "--train-size", "1000", "--seeds", "2")) == 0
    captured = capsys.readouterr()
    assert "2 runs (gn x N=2 x 2 seed(s) x iid)" in captured.out and ", 1 job, output " in captured.out
    assert f"resuming: 1 of 2 runs already done in {out}/\n" in captured.err
    assert captured.err.index("resuming") < captured.err.index("done: val error")


def test_no_resume_trains_the_finished_runs_again(tmp_path, capsys):
    """--no-resume deletes this recipe's runs and trains them again (not 'already done')."""
    data = make_idx_folder(tmp_path / "data", n_train=64, n_val=20)
    out = tmp_path / "out"
    assert cli.run(one_run_args(data, out)) == 0
    first = (out / "records.jsonl").read_text()
    capsys.readouterr()
    assert cli.run(one_run_args(data, out, "--no-resume")) == 0
    err = capsys.readouterr().err
    assert "already done" not in err and "done: val error" in err
    assert len((out / "records.jsonl").read_text().splitlines()) == len(first.splitlines()) == 1


def test_parallel_jobs_share_the_cores(tmp_path, monkeypatch):
    """--jobs J with --threads 0: each job gets cores // J threads (torch and numba), not every core."""
    from concurrent.futures import Future
    import queue as queue_mod

    from groupnorm.study.train import Recipe, Run

    submitted = []

    class Pool:
        def __init__(self, max_workers, **kw):
            self.max_workers = max_workers

        def submit(self, fn, *args):
            submitted.append(args)
            f = Future()
            f.set_result(None)
            return f

        def shutdown(self, *a, **k):
            pass

    class Manager:
        def __init__(self, ctx=None):
            pass

        def start(self, *a):
            pass

        def Queue(self):
            return queue_mod.Queue()

        def shutdown(self):
            pass

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(runner, "SyncManager", Manager)
    monkeypatch.setattr(runner, "cpu_count", lambda: 8)
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    runs = [Run("gn", 2, s) for s in range(3)]
    study = runner.Study(Recipe(), runs, tmp_path)
    study._run_parallel(runs, 2, runner._Bars(study, runs, 2, enabled=False, main=False))
    assert [a[-1] for a in submitted] == [4, 4, 4]
    assert os.environ["NUMBA_NUM_THREADS"] == "4"


def test_a_resumed_run_continues_exactly(tmp_path):
    """Stopped after epoch 1 and resumed from its checkpoint, a run gives the records an
    uninterrupted run gives (model and optimizer momentum restored)."""
    from groupnorm.study.data import DataSet
    from groupnorm.study.train import Recipe, Run, train_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in both runs; restored below
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 4
    x[torch.arange(96), 0, y * 3, :] = 255
    ds = DataSet("tiny", x, y, x[:16], y[:16], 4, "random")
    recipe = Recipe(workers=2, epochs=2, width=8, min_group_channels=4, lr=0.4, warmup_epochs=0.0, probe_size=16)
    run = Run("bn", 4, 0)
    full = train_run(recipe, run, ds)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(event, **info):
        if event == "epoch":
            raise Stop

    ckpt = str(tmp_path / "checkpoint.pt")
    with pytest.raises(Stop):
        train_run(recipe, run, ds, checkpoint=ckpt, progress=stop_after_first_epoch)
    resumed = train_run(recipe, run, ds, checkpoint=ckpt)
    torch.set_num_threads(threads)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("train_loss", "val_loss", "val_error", "train_error"):
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-6), key


def test_log_lines_show_progress_between_finished_runs(capsys, monkeypatch):
    """Without a terminal: a line per finished run, and between them a line per epoch at most every
    HEARTBEAT_S seconds (a log showed nothing for the minutes its first, longest runs took)."""
    from types import SimpleNamespace

    study = SimpleNamespace(runs=["a", "b"])
    bars = runner._Bars(study, ["a", "b"], jobs=1, enabled=False, main=True)

    def epoch(run, e, n=3):
        bars.update({"event": "epoch", "run": run, "epoch": e, "epochs": n, "record": {"val_error": 10.0 + e}})

    epoch("a", 1)
    epoch("a", 2)  # within HEARTBEAT_S of the start: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(bars, "last_line", bars.last_line - runner._Bars.HEARTBEAT_S)
    epoch("a", 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[0/2 runs," in err and "a epoch 2/3: val error 12.0%" in err
    epoch("b", 1)  # the heartbeat line just printed: the next one waits again
    epoch("a", 3)  # a finished run always prints
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[1/2 runs," in err and "a done: val error 13.0% at its last epoch (3)" in err

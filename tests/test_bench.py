"""`groupnorm bench --quick` end to end: it runs, and the CSV/JSON it writes are complete.

No timing is asserted (the machine is shared); only that every figure is there and sane.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from groupnorm import bench
from groupnorm.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--quick", "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out), "--plot"])
    return rc, out


def test_quick_bench_writes_csv_json_and_plot(quick_run):
    rc, out = quick_run
    assert rc == 0
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    # every quick shape x layout (channels-last needs spatial dims) x pass
    expected = {
        (shape, layout, pas)
        for shape, _, _ in bench.QUICK
        for layout in ("contiguous", "channels_last")
        for pas in ("fwd", "bwd", "fwdbwd")
    }
    got = {(tuple(int(v) for v in r["shape"].split("x")), r["layout"], r["pass"]) for r in rows}
    assert got == expected
    for r in rows:
        for col in ("ours_ms", "torch_ms", "floor_ms", "speedup", "vs_floor", "ours_gbps", "copy_gbps"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, f"{col}={r[col]!r} in {r}"
        assert r["backend"] == "numba", "on CPU the automatic backend should be the numba kernels"
        assert math.isclose(float(r["speedup"]), float(r["torch_ms"]) / float(r["ours_ms"]), rel_tol=1e-6)
        assert math.isclose(float(r["vs_floor"]), float(r["ours_ms"]) / float(r["floor_ms"]), rel_tol=1e-6)

    data = json.loads((out / "bench.json").read_text())
    assert set(data) == {"machine", "complete", "kernels", "training", "targets"} and data["complete"] is True
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1
    assert len(data["kernels"]) == len(rows)
    norms = {(r["norm"], r["layout"]) for r in data["training"]}
    assert norms == {
        (n, l)
        for n in ("groupnorm", "torch.nn.GroupNorm", "torch.nn.BatchNorm2d")
        for l in ("contiguous", "channels_last")
    }
    assert all(r["step_ms"] > 0 for r in data["training"])
    bn_ms = {r["layout"]: r["step_ms"] for r in data["training"] if r["norm"] == "torch.nn.BatchNorm2d"}
    for r in data["training"]:
        assert math.isclose(r["vs_batchnorm"], r["step_ms"] / bn_ms[r["layout"]], rel_tol=1e-9), r
    assert any(t["target"].startswith("GN ResNet training step") for t in data["targets"])
    assert (out / "bench_train.csv").exists()
    assert (out / "bench.png").stat().st_size > 0


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--quick", "--plot"]) == 2
    assert "--plot needs --out" in capsys.readouterr().err
    assert main(["bench", "--quick", "--repeats", "0", "--out", str(tmp_path)]) == 2


def test_suites_are_well_formed():
    for name, cases in list(bench.SUITES.items()) + [("quick", bench.QUICK)]:
        for shape, groups, act in cases:
            assert shape[1] % groups == 0, f"{name}: {shape} has channels not divisible by G={groups}"
            assert act in bench.ACT_MODULES


def test_bench_counts_page_faults(quick_run):
    rc, out = quick_run
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for col in ("ours_faults", "torch_faults", "floor_faults"):
            v = float(r[col])
            assert math.isfinite(v) and v >= 0, f"{col}={r[col]!r} in {r}"
    assert json.loads((out / "bench.json").read_text())["machine"]["malloc"] in ("default", bench.STEADY_MALLOC)


def test_timer_sees_the_page_faults_of_fresh_memory():
    """64 MiB is above glibc's largest mmap threshold: every allocation maps fresh pages, and the
    first touch of each faults; the Timer must report them (the bench's faults columns come from it)."""
    import numpy as np

    timer = bench.Timer("cpu")
    timer(lambda: np.ones(1 << 24, dtype=np.float32), calls=2)
    assert timer.faults >= 1
    buf = np.ones(1 << 20, dtype=np.float32)
    timer(lambda: buf.fill(2.0), calls=2)  # touches only pages it already has
    assert timer.faults < 8


def test_steady_malloc_restarts_the_bench_with_glibc_settings(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "steady"
    done = subprocess.run(
        [sys.executable, "-m", "groupnorm", "bench", "--quick", "--train", "no", "--layouts", "contiguous",
         "--repeats", "1", "--warmup", "0", "--threads", "1", "--steady-malloc", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restarting with MALLOC_MMAP_THRESHOLD_" in done.stdout and "malloc steady" in done.stdout
    assert json.loads((out / "bench.json").read_text())["machine"]["malloc"] == bench.STEADY_MALLOC


@pytest.mark.parametrize("command", ["bench", "study"])
def test_help_keeps_examples_on_their_own_lines_and_says_no_empty_defaults(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 4 and all(line.startswith(f"  groupnorm {command}") or "torchrun" in line for line in examples)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: " in text  # defaults that say something are still given


def test_version_flag(capsys):
    import groupnorm

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"groupnorm {groupnorm.__version__}"


def test_interleaved_timing_varies_each_variants_predecessor():
    """Each round runs the variants in a new (seeded) order, so no variant always runs right after
    the same neighbour (what one leaves behind, e.g. a thread pool still spinning, must not fall on
    one other variant only), and a rerun repeats the order."""

    def record():
        calls = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "ABCD"}
        bench.time_interleaved(fns, bench.Timer("cpu"), repeats=12, warmup=1, min_sample_s=0.0, budget_s=0.0)
        return calls[len(fns) * 2:]  # after warm-up and calibration: one call per sample

    calls = record()
    assert len(calls) == 12 * 4 and all(calls.count(n) == 12 for n in "ABCD")
    for n in "ABCD":  # a rotated order (A B C D, B C D A, ...) puts the same one before n in 3/4 of the rounds
        before = [calls[i - 1] for i in range(1, len(calls)) if calls[i] == n]
        assert max(before.count(p) for p in set(before)) <= 0.6 * len(before), (n, before)
    assert record() == calls
    assert all(calls[i] != calls[i - 1] for i in range(1, len(calls)))  # never right after itself


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--out", "{file}"], "it is a file, not a directory"),
    (["--quick", "--out", "{file}/sub"], "cannot write results to --out"),
    (["--suite", "gpu"], "the gpu suite is for --device cuda"),
    (["--quick", "--backend", "nope"], "unknown groupnorm backend 'nope'"),
])
def test_bad_arguments_fail_at_once_with_the_fix(argv, message, tmp_path, capsys):
    """Before any timing (a bad --out used to fail only after the whole run, losing it)."""
    file = tmp_path / "a_file"
    file.write_text("x")
    assert main(["bench", *[a.format(file=file) for a in argv]]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "groupnorm bench on" not in captured.out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("out", ["/proc/x", "/proc"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_timing(out, capsys):
    """/proc passes os.access for root: the folder (and a file in it) is created up front to know."""
    assert main(["bench", "--quick", "--out", out]) == 2
    captured = capsys.readouterr()
    assert "groupnorm bench: error: cannot " in captured.err and f"--out {out} (" in captured.err
    assert "give a directory you can write to" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "groupnorm bench on" not in captured.out


def test_out_folder_is_created_up_front_with_no_scratch_file_left(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_case", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "new" / "deeper"
    assert main(["bench", "--shape", "2x8x4x4", "--groups", "2", "--out", str(out)]) == 130
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_threads_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--threads", value])
    assert exc.value.code == 2
    assert f"groupnorm bench: error: argument --threads: expected a positive integer, got '{value}'" in capsys.readouterr().err


def test_an_unavailable_backend_is_refused_before_timing(monkeypatch, capsys):
    from groupnorm import backends

    class Missing:
        def available(self):
            return "no CUDA device"

    monkeypatch.setitem(backends._loaded, "triton", Missing())
    assert main(["bench", "--shape", "2x32x8x8", "--groups", "4", "--backend", "triton"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("groupnorm bench: error: --backend triton is unavailable here: no CUDA device; "
                            "leave --backend out to time the automatic choice\n")
    assert "groupnorm bench on" not in captured.out


def test_a_backend_that_cannot_take_the_input_is_named():
    import torch

    assert bench._backend_problem("composite", "cpu", [(torch.float32, "none"), (torch.int32, "none")]) == (
        "--backend composite does not support int32 input on cpu; choose one of reference or leave --backend out")
    assert bench._backend_problem("composite", "cpu", [(torch.float32, "silu")]) is None


def test_a_suite_and_shapes_are_both_timed_and_said_so_up_front(monkeypatch, capsys):
    calls = []

    def first_case_interrupted(shape, *a, **k):
        calls.append(shape)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_case", first_case_interrupted)
    assert main(["bench", "--shape", "2x32x8x8", "--groups", "4", "--suite", "resnet"]) == 130
    assert "timing 12 resnet shapes, 1 --shape input; layouts contiguous and channels_last" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "given with --shape, both are timed, the suites first" in text
    assert "in place of the default suites or after any --suite given" in text


def test_a_busy_machine_is_named_before_multi_thread_timings(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    message = bench.busy_warning(2)
    assert "load average 1.6 on 2 CPUs" in message and "--threads 1" in message
    assert bench.busy_warning(1) is None  # one thread does not wait for a second core
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert bench.busy_warning(2) is None
    monkeypatch.delattr(bench.os, "getloadavg")  # Windows has none: no warning, no error
    assert bench.busy_warning(2) is None


def test_cpu_model_names_the_generation_and_vector_width():
    model = bench._cpu_model()
    assert model and model != "unknown"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f" in flags:
        assert "AVX512" in model
    elif " avx2" in flags:
        assert "AVX2" in model


def _row(speedup=1.0, vs_floor=2.0, mib=8.0, act="none", layout="contiguous", pas="fwdbwd", ours_ms=1.0, torch_ms=1.0):
    return {"pass": pas, "mib": mib, "activation": act, "layout": layout, "speedup": speedup, "vs_floor": vs_floor,
            "ours_ms": ours_ms, "torch_ms": torch_ms}


def test_summarize_reads_each_ratio_the_right_way_round():
    """Hand-made rows: a target is met exactly when its ratio is on the right side of the bar."""
    def met(rows, train=()):
        return {t["target"].split(",")[0].split(":")[0]: t["met"] for t in bench.summarize(rows, list(train))}

    fast = [_row(speedup=2.0), _row(speedup=1.7, layout="channels_last", vs_floor=1.1)]
    got = met(fast)
    assert got["fwd+bwd contiguous"] and not got["fwd+bwd channels_last"]  # 2.0 >= 1.6; 1.7 < 5
    assert not met([_row(speedup=2.0), _row(speedup=0.8)])["fwd+bwd contiguous"]  # one shape below 0.9x
    assert met([_row(vs_floor=1.1), _row(vs_floor=1.25)])["shapes >= 4 MiB"]
    assert not met([_row(vs_floor=1.1), _row(vs_floor=1.3)])["shapes >= 4 MiB"]
    assert met([_row(mib=0.01, pas="fwd", ours_ms=0.02)])["per-call overhead on small shapes < 30 us"]
    assert not met([_row(mib=0.01, pas="bwd", ours_ms=0.04)])["per-call overhead on small shapes < 30 us"]
    train = [{"norm": "groupnorm", "layout": "contiguous", "vs_batchnorm": 0.8},
             {"norm": "groupnorm", "layout": "channels_last", "vs_batchnorm": 1.2}]
    got = met([], train)
    assert got["GN ResNet training step (contiguous) no slower than BatchNorm2d"]
    assert not got["GN ResNet training step (channels_last) no slower than BatchNorm2d"]
    # --shape rows (suite "custom") are not graded: a slow tiny custom call leaves the target alone
    mixed = [dict(_row(mib=0.01, pas="fwd", ours_ms=0.02), suite="small"),
             dict(_row(mib=0.01, pas="fwd", ours_ms=0.5), suite="custom")]
    assert met(mixed)["per-call overhead on small shapes < 30 us"]
    assert bench.summarize([dict(_row(speedup=0.5), suite="custom")], []) == []


def test_your_own_shapes_are_timed_with_their_groups_and_activation(tmp_path, capsys):
    """--shape: exactly the shapes given (a repeat once), G and activation as asked, no training step."""
    out = tmp_path / "mine"
    rc = main(["bench", "--shape", "2x8x4x4", "3x6x5", "2x8x4x4", "--groups", "2", "--activation", "silu",
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["complete"] is True and doc["training"] == [] and not (out / "bench_train.csv").exists()
    got = sorted((r["suite"], r["shape"], r["groups"], r["activation"], r["layout"], r["pass"]) for r in doc["kernels"])
    want = sorted(("custom", shape, 2, "silu", layout, pas)
                  for shape in ("2x8x4x4", "3x6x5")
                  for layout in ("contiguous", "channels_last")
                  for pas in ("fwd", "bwd", "fwdbwd"))
    assert got == want
    with open(out / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(want)
    printed = capsys.readouterr().out
    assert "training step" not in printed
    # the project's targets are about its own suites: your shapes are not graded against them
    assert doc["targets"] == [] and "targets (the goals" not in printed


@pytest.mark.parametrize("argv,message", [
    (["--shape", "2x48x4x4"], "--groups 32 does not divide the 48 channels of --shape 2x48x4x4; give a --groups "
                              "that divides 48 (e.g. 16)"),
    (["--groups", "16"], "--groups and --activation apply to --shape inputs"),
    (["--activation", "relu", "--suite", "small"], "--groups and --activation apply to --shape inputs"),
    (["--quick", "--shape", "2x8x4x4", "--groups", "4"], "drop --quick"),
    (["--shape", "2x8x4x4", "--groups", "4", "--train", "only"], "--train only times the training step"),
    (["--shape", "2x8x4x4", "--groups", "0"], "--groups must be >= 1"),
])
def test_shape_arguments_are_checked_before_timing(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "groupnorm bench on" not in captured.out


@pytest.mark.parametrize("text,message", [
    ("8x256xfoo", "is not a shape"),
    ("8", "(N, C, *spatial)"),
    ("8x0x4", "every size >= 1"),
    ("-1x8x4x4", "'-1x8x4x4': a GroupNorm input is (N, C, *spatial) with every size >= 1"),  # not read as an option
])
def test_a_shape_that_is_not_one_is_an_argument_error(text, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--shape", text])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the same after a good shape
        main(["bench", "--shape", "2x8x4x4", text])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_shape_too_large_for_memory_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_available_bytes", lambda: 2**30)
    # 2 x 64 x 256 x 256 float32 = 32 MiB: ten copies fit 1 GiB; 8 x 256 x 256 x 256 = 512 MiB: not
    assert bench._shape_arguments_problem(bench_args("--shape", "2x64x256x256")) is None
    assert main(["bench", "--shape", "8x256x256x256"]) == 2
    err = capsys.readouterr().err
    assert "--shape 8x256x256x256 needs about 5.0 GiB" in err and "1.0 GiB is available" in err
    assert main(["bench", "--shape", "8x256x256x128", "--dtype", "bfloat16"]) == 2  # 128 MiB a copy in bfloat16
    assert "needs about 1.2 GiB" in capsys.readouterr().err


def bench_args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_an_interrupted_bench_keeps_what_it_timed(tmp_path, monkeypatch, capsys):
    """Files are rewritten after every case (atomically), and Ctrl-C says where they are."""
    real = bench.bench_case
    calls = []

    def second_call_interrupted(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            assert json.loads((tmp_path / "bench.json").read_text())["complete"] is False  # already on disk
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "bench_case", second_call_interrupted)
    rc = main(["bench", "--shape", "2x8x4x4", "--groups", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--out", str(tmp_path)])
    assert rc == 130
    assert "interrupted; the 1 cases (shape and layout) timed so far are in" in capsys.readouterr().err
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["complete"] is False
    assert {(r["shape"], r["layout"]) for r in doc["kernels"]} == {("2x8x4x4", "contiguous")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.json"]  # no temporary files left


def test_shapes_with_suites_and_two_dimensional_shapes(tmp_path):
    """--shape next to --suite times both; an (N, C) shape has no channels-last layout of its own, so
    it is timed once (contiguous)."""
    rc = main(["bench", "--suite", "small", "--shape", "4x8", "2x8x4x4", "--groups", "2", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    got = {(r["suite"], r["shape"], r["layout"]) for r in doc["kernels"] if r["pass"] == "fwdbwd"}
    small = {("small", "x".join(map(str, shape)), layout)
             for shape, _, _ in bench.SUITES["small"] for layout in ("contiguous", "channels_last")}
    custom = {("custom", "4x8", "contiguous"), ("custom", "2x8x4x4", "contiguous"), ("custom", "2x8x4x4", "channels_last")}
    assert got == small | custom
    # the per-call target (fwd/bwd calls under 0.05 MiB) is graded on the suite's rows alone, not
    # on the custom ones, which are tiny too
    tiny_rows = [r for r in doc["kernels"] if r["mib"] < 0.05 and r["pass"] in ("fwd", "bwd")]
    assert {r["suite"] for r in tiny_rows} == {"small", "custom"}
    tiny = [t for t in doc["targets"] if t["target"].startswith("per-call overhead")]
    assert len(tiny) == 1
    assert tiny[0]["value"] == pytest.approx(max(r["ours_ms"] for r in tiny_rows if r["suite"] == "small") * 1e3)


def test_every_shape_is_checked_not_only_the_first(monkeypatch):
    """(The checks themselves, not main(): a check that missed the large shape would start timing it.)"""
    problem = bench._shape_arguments_problem(bench_args("--shape", "2x8x4x4", "2x12x4x4", "--groups", "8"))
    assert problem.startswith("--groups 8 does not divide the 12 channels of --shape 2x12x4x4")
    monkeypatch.setattr(bench, "_available_bytes", lambda: 2**30)
    problem = bench._shape_arguments_problem(bench_args("--shape", "8x256x256x256", "2x8x4x4", "--groups", "2"))
    assert problem.startswith("--shape 8x256x256x256 needs about 5.0 GiB")


@pytest.mark.parametrize("text", ["2x8x4", "2,8,4", "2X8X4"])
def test_shape_syntax(text):
    assert bench.parse_shape(text) == (2, 8, 4)


def test_results_without_kernel_rows_still_have_the_csv_header(tmp_path):
    """--train only times no kernels: bench.csv is the header alone, bench.json has no kernels."""
    train = [{"norm": "groupnorm", "layout": "contiguous", "step_ms": 2.0, "vs_batchnorm": 1.0}]
    written = bench.write_outputs(tmp_path, {"cpu": "test"}, [], train, [], plot=True)
    assert [p.name for p in written] == ["bench.csv", "bench_train.csv", "bench.json"]  # no plot of nothing
    assert (tmp_path / "bench.csv").read_text().strip() == ",".join(bench.ROW_COLS)
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["kernels"] == [] and doc["training"] == train and doc["complete"] is True


def test_output_dir_problem_says_what_is_wrong_and_creates_nothing(tmp_path):
    from groupnorm.files import output_dir_problem

    file = tmp_path / "a_file"
    file.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert output_dir_problem(tmp_path) is None
    assert output_dir_problem(tmp_path / "new" / "deeper") is None and not (tmp_path / "new").exists()
    assert output_dir_problem(file) == "it is a file, not a directory"
    assert output_dir_problem(file / "sub" / "deeper") == f"{file} is a file, not a directory"
    assert output_dir_problem(dangling / "sub") == f"{dangling} is a broken symbolic link"


def test_an_interrupt_before_a_case_reaches_the_files_still_saves_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C after a case is timed but before its files are rewritten (here: while its summary is
    computed): the interrupt handler writes it, so the files hold every case the message counts."""
    real = bench.summarize
    calls = []

    def interrupted_once(rows, train_rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(rows, train_rows)

    monkeypatch.setattr(bench, "summarize", interrupted_once)
    rc = main(["bench", "--shape", "2x8x4x4", "--groups", "2", "--layouts", "contiguous", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 130
    assert "interrupted; the 1 cases (shape and layout) timed so far are in" in capsys.readouterr().err
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["complete"] is False and {(r["shape"], r["layout"]) for r in doc["kernels"]} == {("2x8x4x4", "contiguous")}


def test_train_only_times_no_kernel_cases():
    rows = []
    args = bench_args("--train", "only", "--repeats", "1", "--warmup", "0")
    bench._run_cases(args, [("custom", (2, 8, 4, 4), 2, "none")], ["contiguous"], "cpu", bench.Timer("cpu"), {}, rows)
    assert rows == []

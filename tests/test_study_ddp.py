"""Under torchrun (2 gloo processes on the CPU) the study's first steps equal the one-process
run with 2 virtual workers: same seed, same data order, same augmentation, same losses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from groupnorm.study.data import DataSet
from groupnorm.study.train import Dist, Recipe, Run, train_run

REPO = Path(__file__).resolve().parents[1]
NORMS = ("bn", "syncbn", "gn")
STEPS = 6

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {repo!r})
    from groupnorm.study.train import Dist, Run, train_run
    from test_study_ddp import recipe, tiny_data
    torch.set_num_threads(1)
    d = Dist.from_env()
    out = {{}}
    for norm in {norms!r}:
        out[norm] = train_run(recipe(), Run(norm, 4, 0), tiny_data(), d=d, max_steps={steps})[0]["step_losses"]
    if d.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    d.leave()  # what `groupnorm study` does at the end under torchrun
    """
)


def tiny_data() -> DataSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 4
    x[torch.arange(96), 0, y * 3, :] = 255  # learnable, so the losses move
    return DataSet("tiny", x, y, x[:16], y[:16], 4, "random")


def recipe() -> Recipe:
    # no warm-up: the first steps already take full-size learning-rate steps
    return Recipe(workers=2, epochs=1, width=8, min_group_channels=4, lr=0.4, warmup_epochs=0.0,
                  augment="crop-flip", probe_size=16)


@pytest.mark.slow
def test_torchrun_gloo_matches_virtual_workers(tmp_path):
    script = tmp_path / "ddp_steps.py"
    script.write_text(SCRIPT.format(repo=str(REPO), norms=NORMS, steps=STEPS))
    out = tmp_path / "losses.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    for norm in NORMS:
        virtual = train_run(recipe(), Run(norm, 4, 0), tiny_data(), d=Dist(), max_steps=STEPS)[0]["step_losses"]
        assert len(ddp[norm]) == STEPS
        assert max(virtual) - min(virtual) > 1e-3  # the steps really train
        torch.testing.assert_close(torch.tensor(ddp[norm]), torch.tensor(virtual), rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{norm}: {m}")

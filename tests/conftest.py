"""Shared test settings: hypothesis profiles and the list of CPU backends under test."""

import os

import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before anything
# imports triton (test modules are imported in name order), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: the same examples on every run (still drawn by hypothesis, just seeded).
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

"""Test settings shared by the suite: hypothesis profiles and deterministic torch threads.

HYPOTHESIS_PROFILE=dev (default, quick) or ci (more examples; `.ci/run` selects it). deadline=None because the
first torch call in a process is slow, which says nothing about the code under test.
"""

import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))  # lets tests `from tolerances import ...`

settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on a shared 2-core machine

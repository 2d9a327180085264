"""Shared test configuration: hypothesis profiles (REPLD_HYPOTHESIS_PROFILE=nightly for long runs)."""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent / "integration"))

settings.register_profile("default", deadline=None)
settings.register_profile(
    "nightly", deadline=None, max_examples=1000, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("REPLD_HYPOTHESIS_PROFILE", "default"))

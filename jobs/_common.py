"""Shared bits of the ``jobs/`` entry points: make the working directory importable, parse overrides.

Under ``ray job submit --working-dir . -- python jobs/<job>.py ...`` Ray uploads the repository and
runs the script inside it; the same script runs locally (``python jobs/<job>.py ...``), joining a
running cluster (``ray start``) when there is one and starting a local Ray otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the uploaded working dir, even where the package is not installed
    sys.path.insert(0, str(ROOT))

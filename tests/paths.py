"""Where the repository and ../shared are (QVL_SHARED overrides the latter)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QVL_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"

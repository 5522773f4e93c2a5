"""Where things are: the repository, test artifacts, the sim's example specs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
SPECS = REPO / "exo_lab" / "sim" / "specs"

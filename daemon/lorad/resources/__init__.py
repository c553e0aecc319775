"""Files lorad reads at run time, shipped inside the package.

The repository's `schemas/`, `launchd/` and `jobspecs/demo.yaml` are symbolic
links to these files, so the checkout and an installed wheel read the same
bytes (one copy of each).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SCHEMA = "jobspec.schema.json"
DEMO_SPEC = "demo.yaml"
TEXT_TO_SQL = "text_to_sql.jsonl.gz"
STATUS_SCHEMA = "status.schema.json"
LAUNCHD_PLIST = "dev.lorad.daemon.plist"
SYSTEMD_UNIT = "lorad.service"


def path(name: str) -> Path:
    """A resource as a file path (wheels install unpacked, so this is a real file)."""
    return Path(str(resources.files(__name__) / name))


def read_text(name: str) -> str:
    return (resources.files(__name__) / name).read_text(encoding="utf-8")

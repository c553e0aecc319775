"""Which inbox files are job specs, when they are complete, and claiming them.

Sync tools and editors leave temporary, partial, placeholder and conflict files
next to real specs. Only names on an allowlist become jobs; conflict copies are
reported (never run). A file is complete when nobody has it open for writing
(Linux: the kernel's word, from /proc) and it has stopped changing for `settle`
seconds — or, when it arrived by rename, `rename_delay` seconds after the rename
(the writer finished before renaming; the delay lets a sync tool finish its own
bookkeeping, or it may never notice that lorad took the file).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lorad.fsutil import fsync_dir, fsync_file

SPEC_NAME = re.compile(r"^[^.~#$].*\.ya?ml$", re.IGNORECASE)
# Named so by the tool itself: a conflict whatever else is in the folder.
CONFLICT_NAMES = [
    re.compile(r"^(?P<stem>.*?) \(.*conflicted copy.*\)(?P<ext>\.ya?ml)$", re.IGNORECASE),  # Dropbox
    re.compile(r"^(?P<stem>.*?)\.sync-conflict-\d{8}-\d{6}(?:-[A-Z0-9]{7})?(?P<ext>\.ya?ml)$", re.IGNORECASE),  # Syncthing
]
# Named so by iCloud Drive ("job 2.yaml") and OneDrive or browsers ("job (2).yaml"), but also what
# people call files ("llama 3.yaml"): a conflict only with evidence that the original is or was here.
MAYBE_CONFLICT_NAMES = [
    re.compile(r"^(?P<stem>.+) \d+(?P<ext>\.ya?ml)$", re.IGNORECASE),
    re.compile(r"^(?P<stem>.+) \(\d+\)(?P<ext>\.ya?ml)$", re.IGNORECASE),
]
CONTROL_NAME = re.compile(r"^(?:cancel-(?P<a>[^/]+?)|(?P<b>[^/.][^/]*?)\.cancel)$")
PLACEHOLDER = ".lorad"  # a file lorad keeps in the inbox, so two-way sync tools never see it emptied
SF_DATALESS = 0x40000000  # macOS: an evicted iCloud / File Provider file; reading it blocks


def classify(name: str) -> str:
    """'spec', 'conflict', 'maybe-conflict', 'cancel' or 'ignore' for a file name in the inbox."""
    name = unicodedata.normalize("NFC", name)
    if CONTROL_NAME.match(name):
        return "cancel"
    if not SPEC_NAME.match(name) or "___jb_" in name:
        return "ignore"
    if any(p.match(name) for p in CONFLICT_NAMES):
        return "conflict"
    if any(p.match(name) for p in MAYBE_CONFLICT_NAMES):
        return "maybe-conflict"
    return "spec"


def conflict_original(name: str) -> str | None:
    """The file a conflict copy lost to: 'job.yaml' for 'job 2.yaml' or 'job.sync-conflict-….yaml'."""
    name = unicodedata.normalize("NFC", name)
    for pattern in CONFLICT_NAMES + MAYBE_CONFLICT_NAMES:
        m = pattern.match(name)
        if m:
            return m.group("stem") + m.group("ext")
    return None


def cancel_target(name: str) -> str | None:
    m = CONTROL_NAME.match(unicodedata.normalize("NFC", name))
    return (m.group("a") or m.group("b")) if m else None


def open_for_writing(path: Path) -> bool | None:
    """Whether any process has path open for writing (Linux /proc); None where the OS cannot tell.

    Processes of other users cannot be inspected without privileges: their writes are caught by
    the settle rule instead.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        target = os.stat(path)
    except OSError:
        return False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                if st.st_ino != target.st_ino or st.st_dev != target.st_dev:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                return True
    return False


def is_dataless(st: os.stat_result) -> bool:
    return bool(getattr(st, "st_flags", 0) & SF_DATALESS)


@dataclass
class Candidate:
    key: tuple[int, int, int]  # (size, mtime_ns, inode)
    changed_at: float  # monotonic time the key last changed
    mtime_ns: int
    moved_in: bool = False
    checks: int = 0


class InboxTracker:
    """Decides when an inbox file is complete enough to claim.

    Rules, in order: a file that arrived by rename is complete; a file whose
    size, mtime and inode have not changed for `settle` seconds is complete; a
    file found already old (at start-up or in a rescan) is complete once a
    second look finds it unchanged. Empty files wait longer: an editor may be
    about to fill them.
    """

    def __init__(self, inbox: Path, settle: float = 2.0, empty_settle: float = 10.0, rename_delay: float = 0.5):
        self.inbox = inbox
        self.settle = settle
        self.empty_settle = empty_settle
        self.rename_delay = rename_delay
        self.candidates: dict[str, Candidate] = {}
        self.left: dict[str, tuple[int, int, int]] = {}  # files for another daemon, as they were when judged

    def note(self, name: str, moved_in: bool = False) -> None:
        """A watcher event (or scan hit) for inbox/name."""
        name = os.path.basename(name)
        if classify(name) == "ignore":
            return
        cand = self._observe(name)
        if cand and moved_in:
            cand.moved_in = True

    def scan(self) -> None:
        """Look at the whole inbox: watchers lose events, so this is the ground truth."""
        try:
            names = os.listdir(self.inbox)
        except FileNotFoundError:
            return
        present = set()
        for name in names:
            if classify(name) != "ignore":
                present.add(name)
                self._observe(name)
        for gone in set(self.candidates) - present:
            del self.candidates[gone]
        for gone in set(self.left) - present:
            del self.left[gone]

    def _observe(self, name: str) -> Candidate | None:
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self.candidates.pop(name, None)
            return None
        if not stat.S_ISREG(st.st_mode) or is_dataless(st):
            self.candidates.pop(name, None)
            return None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self.left.get(name) == key:
            self.candidates.pop(name, None)
            return None
        self.left.pop(name, None)
        cand = self.candidates.get(name)
        now = time.monotonic()
        if cand is None or cand.key != key:
            cand = Candidate(key=key, changed_at=now, mtime_ns=st.st_mtime_ns)
            self.candidates[name] = cand
        return cand

    def ready(self) -> list[str]:
        """Names complete now, oldest first (by mtime, then name)."""
        out = []
        now, wall = time.monotonic(), time.time()  # one reading for all: an older file is never judged later
        for name in list(self.candidates):
            before = self.candidates[name].key
            seen = self._observe(name)
            if seen is None:
                continue
            cand = seen
            if cand.key != before:
                continue
            cand.checks += 1
            quiet = now - cand.changed_at
            age = wall - cand.mtime_ns / 1e9
            size = cand.key[0]
            settle = self.settle if size else self.empty_settle
            if (cand.moved_in and size and quiet >= self.rename_delay) or quiet >= settle or (age >= settle and cand.checks >= 2):
                if open_for_writing(self.inbox / name):  # a writer that paused: not complete, however quiet
                    cand.changed_at, cand.checks, cand.moved_in = now, 0, False
                    continue
                out.append(name)
        out.sort(key=lambda n: (self.candidates[n].mtime_ns, n))
        return out

    def forget(self, name: str) -> None:
        self.candidates.pop(name, None)

    def leave(self, name: str) -> None:
        """A file another daemon will claim: not a candidate here (nor pending) until it changes."""
        self.candidates.pop(name, None)
        try:
            st = os.lstat(self.inbox / name)
        except OSError:
            return
        self.left[name] = (st.st_size, st.st_mtime_ns, st.st_ino)

    @property
    def pending(self) -> bool:
        return bool(self.candidates)


def claim(src: Path, dest: Path) -> bool:
    """Move src to dest atomically; False when someone else got it first.

    Across file systems (an inbox on another volume) rename fails with EXDEV:
    then copy, fsync, and unlink the source.
    """
    try:
        os.rename(src, dest)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                fsync_file(fout.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: the source stays in the inbox, nothing half-written stays here
            raise
        os.replace(tmp, dest)
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
    fsync_dir(dest.parent)
    return True

"""File-system events for the inbox, as hints only.

Events are coalesced, lost, or arrive with the wrong type (FSEvents, inotify
moves), so each one only says "look at this name again"; the periodic rescan
is the ground truth. The handler never raises (a raising handler silently
kills watchdog's thread) and the daemon rebuilds an observer that died.
"""

from __future__ import annotations

import os
import queue
import sys
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver


class _Forward(FileSystemEventHandler):
    def __init__(self, inbox: Path, out: queue.Queue):
        self.inbox = os.fsdecode(inbox)
        self.out = out

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.is_directory:
                return
            dest = os.fsdecode(getattr(event, "dest_path", "") or "")
            if event.event_type == "moved" and dest:
                if os.path.dirname(dest) == self.inbox:
                    self.out.put((os.path.basename(dest), True))
                return
            src = os.fsdecode(event.src_path)
            if src and os.path.dirname(src) == self.inbox:
                self.out.put((os.path.basename(src), False))
        except Exception:  # noqa: BLE001 - a raising handler kills the observer thread
            pass


def start(inbox: Path, out: queue.Queue, polling: bool = False) -> BaseObserver:
    """Watch inbox; put (name, arrived_by_rename) on out for each event."""
    if polling:
        observer: BaseObserver = PollingObserver(timeout=1.0)
    elif sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver

        # full events: a rename into the inbox from elsewhere is a move, not a create
        observer = InotifyObserver(generate_full_events=True)
    else:
        from watchdog.observers import Observer

        observer = Observer()
    observer.schedule(_Forward(inbox, out), os.fspath(inbox), recursive=False)
    observer.daemon = True
    observer.start()
    return observer

"""Two real Syncthing instances on 127.0.0.1 sharing one folder, for the sync tests.

Discovery (global and local), relays, NAT traversal, STUN, usage and crash reporting and upgrades are
all off: the two talk to each other over loopback and to nothing else. Each has its REST API on its own
loopback port, which the tests use to wait for the connection and to pause or resume it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Instance:
    name: str
    home: Path
    folder: Path
    device_id: str
    listen_port: int
    gui_port: int
    api_key: str
    proc: subprocess.Popen | None = None

    def rest(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui_port}{path}", method=method,
                                     headers={"X-API-Key": self.api_key})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        return json.loads(body) if body.strip() else None


OFF_OPTIONS = {
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
    "natEnabled": "false", "urAccepted": "-1", "startBrowser": "false", "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0", "stunKeepaliveStartS": "0", "stunKeepaliveMinS": "0",
    "globalAnnounceServer": "", "stunServer": "", "releasesURL": "", "reconnectionIntervalS": "1",
}


def _generate(name: str, base: Path, folder: Path) -> Instance:
    home = base / f"st-{name}"
    out = subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"],
                         capture_output=True, text=True, timeout=60, check=True)
    device_id = next(line.split("Device ID:")[1].strip() for line in (out.stdout + out.stderr).splitlines()
                     if "Device ID:" in line)
    api_key = ET.parse(home / "config.xml").getroot().findtext("gui/apikey") or ""
    folder.mkdir(parents=True, exist_ok=True)
    return Instance(name, home, folder, device_id, free_port(), free_port(), api_key)


def _configure(me: Instance, peer: Instance, folder_id: str, dials: bool) -> None:
    path = me.home / "config.xml"
    tree = ET.parse(path)
    root = tree.getroot()
    options = root.find("options")
    assert options is not None
    for key, value in OFF_OPTIONS.items():
        node = options.find(key)
        if node is None:
            node = ET.SubElement(options, key)
        node.text = value
    for node in options.findall("listenAddress"):
        options.remove(node)
    ET.SubElement(options, "listenAddress").text = f"tcp://127.0.0.1:{me.listen_port}"
    gui = root.find("gui")
    assert gui is not None
    address = gui.find("address")
    assert address is not None
    address.text = f"127.0.0.1:{me.gui_port}"
    device = ET.SubElement(root, "device", id=peer.device_id, name=peer.name, compression="metadata",
                           introducer="false", skipIntroductionRemovals="false", introducedBy="")
    # Only one side dials: two instances dialling each other at once race ("Failed to exchange Hello
    # messages", seen in CI on a loaded machine). With discovery off, "dynamic" means "wait to be called".
    ET.SubElement(device, "address").text = f"tcp://127.0.0.1:{peer.listen_port}" if dials else "dynamic"
    ET.SubElement(device, "paused").text = "false"
    folder = ET.Element("folder", id=folder_id, label=folder_id, path=str(me.folder), type="sendreceive",
                        rescanIntervalS="3600", fsWatcherEnabled="true", fsWatcherDelayS="1", ignorePerms="false",
                        autoNormalize="true")
    for dev in (me.device_id, peer.device_id):
        ET.SubElement(folder, "device", id=dev, introducedBy="")
    ET.SubElement(folder, "filesystemType").text = "basic"
    ET.SubElement(folder, "minDiskFree", unit="%").text = "0"
    ET.SubElement(folder, "maxConflicts").text = "10"  # Syncthing's default; an element left out means 0: no copies
    root.insert(0, folder)
    tree.write(path)


class SyncthingPair:
    """`with SyncthingPair(tmp, a_folder, b_folder) as pair:` — both running and connected."""

    def __init__(self, base: Path, folder_a: Path, folder_b: Path):
        self.a = _generate("a", base, folder_a)
        self.b = _generate("b", base, folder_b)
        _configure(self.a, self.b, "lorad", dials=True)
        _configure(self.b, self.a, "lorad", dials=False)
        self.logs: list[Path] = []

    def __enter__(self) -> SyncthingPair:
        env = {**os.environ, "STNOUPGRADE": "1", "STNORESTART": "1", "STNODEFAULTFOLDER": "1"}
        for inst in (self.a, self.b):
            log = inst.home / "syncthing.log"
            self.logs.append(log)
            inst.proc = subprocess.Popen(
                ["syncthing", "serve", f"--home={inst.home}", "--no-browser", "--no-restart", "--logflags=0"],
                stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                start_new_session=True)  # its own group: the monitor and the syncthing it runs go together
        self.wait_connected()
        return self

    def connected(self) -> bool:
        try:
            conns = self.a.rest("/rest/system/connections")
        except OSError:
            return False
        assert isinstance(conns, dict)
        return bool(conns.get("connections", {}).get(self.b.device_id, {}).get("connected"))

    def wait_connected(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected():
                return
            time.sleep(0.3)
        raise AssertionError("the two Syncthing instances did not connect:\n"
                             + "\n".join(p.read_text(errors="replace")[-1500:] for p in self.logs))

    def scan(self) -> None:
        """Have both sides scan the folder now (returns when the scans are done)."""
        for inst in (self.a, self.b):
            inst.rest("/rest/db/scan?folder=lorad", "POST")

    def pause(self) -> None:
        self.a.rest(f"/rest/system/pause?device={self.b.device_id}", "POST")

    def resume(self) -> None:
        self.a.rest(f"/rest/system/resume?device={self.b.device_id}", "POST")
        self.wait_connected()

    def __exit__(self, *exc: object) -> None:
        for inst in (self.a, self.b):
            if inst.proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(inst.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    inst.proc.wait(timeout=wait)
                    time.sleep(0.2)
                except subprocess.TimeoutExpired:
                    pass

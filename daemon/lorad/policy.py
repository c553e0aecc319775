"""What a job spec may make the daemon do: the owner's trust policy, not the spec's.

Whoever can write a file into the inbox (a shared Dropbox folder, a synced phone)
can submit a spec. The spec runs with the owner's files, keys and network, so
the daemon — not the spec — decides:

- which folders `path:` data and models may be read from (default: the inbox's own
  `data/` folder, the Hugging Face cache and Ollama's models folder; the bundled
  data and the demo model need none). A path outside them is refused with the
  same words whether or not it exists.
- which Ollama server the model may be sent to (default: the daemon's own,
  `$OLLAMA_HOST` or 127.0.0.1:11434; others only when listed).
- which hosts training may reach over SSH (none unless listed; local ranks are fine).
- which services training may report its settings and losses to (`train.report_to`: none
  unless listed).

The policy comes from `ROOT/policy.yaml` and `lorad run --allow-*` flags; `lorad
doctor` shows it. It is checked when a spec is claimed (a clear rejection with
the spec's line) and again by the stage right before it reads or connects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICY_FILE = "policy.yaml"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
REPORT_SERVICES = ("wandb", "swanlab")  # train.report_to, as mlx_lm.lora --report-to
HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}@)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


class PolicyError(Exception):
    """A spec asks for something the owner did not allow."""


def _ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _hf_cache() -> Path:
    hub = os.environ.get("HF_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def normalize_url(url: str) -> str:
    from lorad.ollama import resolve_host

    return resolve_host(url).rstrip("/").lower()


@dataclass(frozen=True)
class Policy:
    read_roots: tuple[Path, ...]
    ollama_host: str  # the daemon's own Ollama: always allowed
    ollama_hosts: tuple[str, ...] = ()  # other servers a spec may name
    train_hosts: tuple[str, ...] = ()  # SSH destinations a spec may train on
    report_to: tuple[str, ...] = ()  # services a spec may report training to
    inbox: Path | None = None  # relative `path:` references resolve here
    sources: tuple[str, ...] = field(default=())  # where this policy came from, for `lorad doctor`

    # --- reading --------------------------------------------------------------
    def resolve_path(self, ref: str) -> Path:
        """The file a `path:` reference names, refused unless it is inside a readable folder.

        Relative references are relative to the inbox. Symbolic links are resolved first,
        so a link inside an allowed folder cannot lead outside it.
        """
        raw = Path(ref).expanduser()
        if not raw.is_absolute():
            raw = (self.inbox or Path.cwd()) / raw
        real = Path(os.path.realpath(raw))
        for root in self.read_roots:
            root_real = Path(os.path.realpath(root))
            if real == root_real or root_real in real.parents:
                return real
        raise PolicyError(f"path:{ref} is outside the folders this daemon reads from "
                          f"({', '.join(str(r) for r in self.read_roots) or 'none'}); the owner can allow a folder "
                          f"with `lorad run --allow-read DIR` or in {POLICY_FILE}")

    # --- sending ----------------------------------------------------------------
    def resolve_ollama(self, host: str | None) -> str:
        """The Ollama base URL to use: the daemon's own unless the spec names a listed one."""
        if not host:
            return self.ollama_host
        wanted = normalize_url(host)
        if wanted == normalize_url(self.ollama_host) or wanted in {normalize_url(h) for h in self.ollama_hosts}:
            return wanted
        raise PolicyError(f"ollama.host {host!r} is not this daemon's Ollama ({self.ollama_host}) nor one the owner "
                          f"listed; the owner can allow it with `lorad run --allow-ollama-host URL` or in {POLICY_FILE}")

    # --- connecting -------------------------------------------------------------
    def check_train_host(self, host: str) -> str:
        if not HOST_RE.match(host):
            raise PolicyError(f"train.distributed.hosts: {host!r} is not a host name (user@host or host; "
                              "no URLs, no options)")
        if host in LOCAL_HOSTS or host in self.train_hosts:
            return host
        raise PolicyError(f"train.distributed.hosts: {host!r} is not a host the owner allows training on; "
                          f"the owner can allow it with `lorad run --allow-train-host {host}` or in {POLICY_FILE}")

    def check_report_to(self, service: str) -> str:
        if service in self.report_to:
            return service
        raise PolicyError(f"train.report_to: {service!r} would send this job's settings and losses to that service, "
                          f"and the owner does not allow it; the owner can with `lorad run --allow-report-to {service}` "
                          f"or in {POLICY_FILE}")

    def describe(self) -> dict[str, Any]:
        return {"read": [str(p) for p in self.read_roots], "ollama_host": self.ollama_host,
                "ollama_hosts": list(self.ollama_hosts), "train_hosts": list(self.train_hosts),
                "report_to": list(self.report_to), "from": list(self.sources)}


def load(root: Path, inbox: Path, allow_read: list[str] | None = None, allow_ollama: list[str] | None = None,
         allow_train: list[str] | None = None, allow_report: list[str] | None = None) -> Policy:
    """The policy of a root: defaults, then ROOT/policy.yaml, then command-line flags (which add)."""
    from lorad.ollama import resolve_host

    read: list[Path] = [inbox / "data", _hf_cache(), _ollama_models_dir()]
    ollama_hosts: list[str] = []
    train_hosts: list[str] = []
    report_to: list[str] = []
    ollama_host = resolve_host(None)
    sources = ["defaults"]
    path = root / POLICY_FILE
    if path.exists():
        try:
            conf = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PolicyError(f"{path}: {e}") from None
        if not isinstance(conf, dict):
            raise PolicyError(f"{path}: expected a mapping with read, ollama_host, ollama_hosts, train_hosts, report_to")
        unknown = set(conf) - {"read", "ollama_host", "ollama_hosts", "train_hosts", "report_to"}
        if unknown:
            raise PolicyError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        read += [Path(str(p)).expanduser() for p in conf.get("read") or []]
        ollama_hosts += [str(h) for h in conf.get("ollama_hosts") or []]
        train_hosts += [str(h) for h in conf.get("train_hosts") or []]
        report_to += [str(h) for h in conf.get("report_to") or []]
        if conf.get("ollama_host"):
            ollama_host = resolve_host(str(conf["ollama_host"]))
        sources.append(str(path))
    if allow_read or allow_ollama or allow_train or allow_report:
        sources.append("command line")
    read += [Path(p).expanduser().absolute() for p in allow_read or []]
    ollama_hosts += list(allow_ollama or [])
    train_hosts += list(allow_train or [])
    report_to += list(allow_report or [])
    for service in report_to:
        if service not in REPORT_SERVICES:
            raise PolicyError(f"report_to: {service!r} is not one of {', '.join(REPORT_SERVICES)}")
    for host in train_hosts:
        if not HOST_RE.match(host):
            raise PolicyError(f"train host {host!r} is not a host name (user@host or host)")
    return Policy(tuple(read), ollama_host, tuple(ollama_hosts), tuple(train_hosts), tuple(dict.fromkeys(report_to)),
                  inbox, tuple(sources))


def to_env(policy: Policy) -> dict[str, str]:
    """The policy for a stage process (it checks again right before it reads or connects)."""
    import json

    return {"LORAD_POLICY": json.dumps({"read": [str(p) for p in policy.read_roots], "ollama_host": policy.ollama_host,
                                        "ollama_hosts": list(policy.ollama_hosts),
                                        "train_hosts": list(policy.train_hosts), "report_to": list(policy.report_to),
                                        "inbox": str(policy.inbox) if policy.inbox else None})}


def from_env() -> Policy | None:
    """The daemon's policy inside a stage process; None outside the daemon (tests, a stage run by hand)."""
    import json

    text = os.environ.get("LORAD_POLICY")
    if not text:
        return None
    d = json.loads(text)
    return Policy(tuple(Path(p) for p in d["read"]), d["ollama_host"], tuple(d["ollama_hosts"]),
                  tuple(d["train_hosts"]), tuple(d.get("report_to") or ()), Path(d["inbox"]) if d.get("inbox") else None, ("daemon",))


def spec_problems(spec: dict[str, Any], policy: Policy) -> list[tuple[list[Any], str]]:
    """(JSON path parts, message) for everything in a valid spec that the policy refuses."""
    problems: list[tuple[list[Any], str]] = []
    for parts in (["data", "source"], ["model", "source"], ["evaluate", "data"], ["train", "init_adapters"]):
        section = spec.get(parts[0])
        ref = section.get(parts[1]) if isinstance(section, dict) else None
        if isinstance(ref, str) and ref.startswith("path:"):
            try:
                policy.resolve_path(ref[len("path:"):])
            except PolicyError as e:
                problems.append((parts, str(e)))
    host = (spec.get("ollama") or {}).get("host")
    if host:
        try:
            policy.resolve_ollama(host)
        except PolicyError as e:
            problems.append((["ollama", "host"], str(e)))
    for i, h in enumerate(((spec.get("train") or {}).get("distributed") or {}).get("hosts") or []):
        try:
            policy.check_train_host(str(h))
        except PolicyError as e:
            problems.append((["train", "distributed", "hosts", i], str(e)))
    for i, service in enumerate((spec.get("train") or {}).get("report_to") or []):
        try:
            policy.check_report_to(str(service))
        except PolicyError as e:
            problems.append((["train", "report_to", i], str(e)))
    return problems

"""The `lorad` command line (see CONTRACT.md for the contract it keeps)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lorad import layout as layout_mod
from lorad import outbox


def _layout(args: argparse.Namespace) -> layout_mod.Layout:
    return layout_mod.resolve(getattr(args, "root", None), getattr(args, "inbox", None), getattr(args, "outbox", None))


def cmd_run(args: argparse.Namespace) -> int:
    from lorad import policy
    from lorad.daemon import run

    lay = _layout(args)
    try:
        trust = policy.load(lay.root, lay.inbox, args.allow_read, args.allow_ollama_host, args.allow_train_host,
                             args.allow_report_to)
    except policy.PolicyError as e:
        print(f"lorad: {e}", file=sys.stderr)
        return 2
    return run(lay, once=args.once, polling=args.force_polling, settle=args.settle,
               rescan_interval=args.rescan_interval, retry_backoff=args.retry_backoff, policy=trust,
               rename_delay=args.rename_delay, name=args.name, default_daemon=args.default_daemon)


def cmd_validate(args: argparse.Namespace) -> int:
    from lorad.spec import check_file

    bad = 0
    for name in args.files:
        result = check_file(Path(name))
        for problem in result.problems:
            print(problem.format(name))
        if result.ok:
            print(f"{name}: OK")
        bad += not result.ok
    return 1 if bad else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from lorad.fsutil import fsync_dir, fsync_file
    from lorad.spec import check_file

    src = Path(args.file)
    result = check_file(src)
    if not result.ok:
        for problem in result.problems:
            print(problem.format(args.file), file=sys.stderr)
        print(f"lorad: {args.file} was not submitted", file=sys.stderr)
        return 1
    assert result.spec is not None  # ok means a spec with defaults
    dist = result.spec["train"].get("distributed") or {}
    if dist.get("hosts"):
        from lorad.distributed import HostError, check_hosts

        try:
            check_hosts(dist["hosts"], dist.get("min_hosts"))
        except HostError as e:
            print(f"{args.file}: $.train.distributed.hosts: {e}", file=sys.stderr)
            print(f"lorad: {args.file} was not submitted", file=sys.stderr)
            return 1
    lay = _layout(args)
    lay.inbox.mkdir(parents=True, exist_ok=True)
    job_id = outbox.new_job_id(result.spec["name"], lambda j: lay.job_dir(j).exists())
    tmp = lay.inbox / f".{job_id}.yaml.tmp"  # dot-name: the daemon ignores it until the rename
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
        if args.rerun:  # other bytes than the earlier submission: not a duplicate (a comment changes no setting)
            fout.write(f"\n# rerun requested by `lorad submit --rerun` at {outbox.now_iso()}\n".encode())
        fout.flush()
        fsync_file(fout.fileno())
    os.replace(tmp, lay.inbox / f"{job_id}.yaml")
    fsync_dir(lay.inbox)
    print(job_id)
    return 0


def find_job(lay: layout_mod.Layout, ref: str) -> str | None:
    """A job id, a unique prefix of one, or a job name (the newest job of that name)."""
    if (lay.outbox / ref / "status.json").exists():
        return ref
    ids = sorted(p.name for p in lay.outbox.iterdir() if (p / "status.json").exists()) if lay.outbox.exists() else []
    prefixed = [j for j in ids if j.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    named = [j for j in ids if (outbox.read_status(lay.outbox / j) or {}).get("name") == ref]
    return named[-1] if named else None


def _all_status(lay: layout_mod.Layout) -> list[dict[str, Any]]:
    if not lay.outbox.exists():
        return []
    rows = [outbox.read_status(p) for p in sorted(lay.outbox.iterdir()) if p.is_dir()]
    return [r for r in rows if r]


def _bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:3.0f}%"


def _detail(status: dict[str, Any], bar: bool = False) -> str:
    """What a user wants to know next: the progress of a running stage, or why a job did not succeed."""
    if status.get("state") in ("failed", "rejected", "cancelled", "superseded", "duplicate"):
        error = status.get("error") or {}
        first = (error.get("errors") or [{}])[0]
        where = f"line {first['line']}: " if first.get("line") else ""
        return (f"{where}{first.get('path', '')}: {first['message']}" if first.get("message") and first.get("path")
                else error.get("message") or status["state"])
    return _progress_text(status, bar)


def _progress_text(status: dict[str, Any], bar: bool = False) -> str:
    p = status.get("progress") or {}
    if status.get("state") != "running" or not p.get("iters"):
        return ""
    if p.get("stage") and p.get("stage") != status.get("stage"):
        return ""  # an earlier stage's numbers; the running stage has reported none yet
    text = f"{p.get('iteration', 0)}/{p['iters']}"
    if bar:
        text = _bar(p.get("iteration", 0) / p["iters"]) + " " + text
    if p.get("train_loss") is not None:
        text += f" loss {p['train_loss']:.3f}"
    if p.get("val_loss") is not None:
        text += f" val {p['val_loss']:.3f}"
    if p.get("eta_seconds") is not None:
        text += f" eta {int(p['eta_seconds'])}s"
    return text


def _table(rows: list[dict[str, Any]], bar: bool = False, width: int | None = None) -> str:
    """One line per job; DETAIL is progress or the reason it failed. Lines are cut to `width` columns."""
    header = ("JOB", "STATE", "STAGE", "DETAIL")
    lines = [header]
    for s in rows:
        lines.append((s.get("job_id", ""), s.get("state", ""), s.get("stage") or "-", _detail(s, bar) or "-"))
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header) - 1)]
    out = []
    for r in lines:
        text = ("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1])).rstrip()
        if width and len(text) > width:
            text = text[: width - 1] + "…"
        out.append(text)
    return "\n".join(out)


RECENT_FINISHED = 5  # finished jobs `status --watch` shows below the active ones


def _watch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    active = [r for r in rows if r.get("state") not in outbox.FINAL_STATES]
    finished = [r for r in rows if r.get("state") in outbox.FINAL_STATES]
    return active + finished[-RECENT_FINISHED:]


def cmd_status(args: argparse.Namespace) -> int:
    lay = _layout(args)

    def collect() -> list[dict[str, Any]] | None:
        if args.job:
            job_id = find_job(lay, args.job)
            if job_id is None:
                return None
            return [outbox.read_status(lay.job_dir(job_id)) or {"job_id": job_id, "state": "unknown"}]
        return _all_status(lay)

    rows = collect()
    if rows is None:
        print(f"lorad: no job {args.job!r} in {lay.outbox}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows[0] if args.job else rows, indent=2))
        return 0
    if not args.watch:
        print(_table(rows))
        return 0
    try:
        while True:
            rows = collect() or []
            if not args.job and not args.all:
                rows = _watch_rows(rows)
            sys.stdout.write("\x1b[2J\x1b[H" if sys.stdout.isatty() else "")
            print(_table(rows, bar=True, width=shutil.get_terminal_size((80, 24)).columns), flush=True)
            if args.job and rows and rows[0].get("state") in outbox.FINAL_STATES:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _job_request(args: argparse.Namespace, verb: str) -> int:
    """cancel / retry: a request file for a running daemon, else a transition under the root's lock."""
    from lorad import daemon, jobstore

    lay = _layout(args)
    job_id = find_job(lay, args.job)
    if job_id is None:
        print(f"lorad: no job {args.job!r} in {lay.outbox}", file=sys.stderr)
        return 1
    if daemon.daemon_running(lay):
        lay.requests.mkdir(parents=True, exist_ok=True)
        (lay.requests / f"{job_id}.{verb}").touch()
        print(f"{job_id}: {verb} requested")
        return 0
    try:
        with daemon.exclusive(lay) as store:
            job = store.get(job_id)
            if job is None:
                print(f"lorad: {job_id} is not in {lay.store}", file=sys.stderr)
                return 1
            message = daemon.cancel_job(store, job) if verb == "cancel" else daemon.retry_job(store, job)
            job = store.get(job_id)
            if job is not None:
                outbox.write_status(lay.job_dir(job_id), jobstore.status_view(job))
    except daemon.AlreadyRunning:
        print("lorad: a daemon started meanwhile; try again", file=sys.stderr)
        return 1
    print(message)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    return _job_request(args, "cancel")


def cmd_retry(args: argparse.Namespace) -> int:
    return _job_request(args, "retry")


def cmd_demo(args: argparse.Namespace) -> int:
    from lorad import resources
    from lorad.daemon import run

    lay = _layout(args)
    spec = resources.path(resources.DEMO_SPEC)
    submit_args = argparse.Namespace(file=str(spec), root=str(lay.root), inbox=None, outbox=None, rerun=True)
    if cmd_submit(submit_args) != 0:
        return 1
    code = run(lay, once=True)
    rows = [s for s in _all_status(lay) if s.get("name") == "demo"]
    if not rows:
        return code or 1
    last = rows[-1]
    job_dir = lay.job_dir(last["job_id"])
    print(_table([last]))
    print(f"\nartifacts in {job_dir}:")
    for name, rel in sorted((last.get("artifacts") or {}).items()):
        print(f"  {name:12s} {job_dir / rel}")
    return 0 if last.get("state") == "succeeded" else 1


def cmd_score(args: argparse.Namespace) -> int:
    from lorad.score import main as score_main

    return score_main(args.pairs, args.engine, args.rows)


def cmd_compare(args: argparse.Namespace) -> int:
    from lorad.compare import compare_table, load_job
    from lorad.fsutil import atomic_write_text

    lay = _layout(args)
    jobs = []
    for ref in args.jobs:
        job_id = find_job(lay, ref)
        if job_id is None:
            print(f"lorad: no job {ref!r} in {lay.outbox}", file=sys.stderr)
            return 1
        jobs.append(load_job(lay.job_dir(job_id)))
    table = compare_table(jobs)
    print(table, end="")
    if args.output:
        atomic_write_text(Path(args.output), "# lorad compare\n\n" + table)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _service_kind(args: argparse.Namespace) -> str:
    from lorad import service

    return "launchd" if args.launchd else "systemd" if args.systemd else service.default_kind()


def cmd_install_agent(args: argparse.Namespace) -> int:
    from lorad import service

    return service.install(_layout(args), _service_kind(args), args.dry_run)


def cmd_uninstall_agent(args: argparse.Namespace) -> int:
    from lorad import service

    return service.uninstall(_service_kind(args), args.dry_run)


def cmd_restart_agent(args: argparse.Namespace) -> int:
    from lorad import service

    return service.restart(_service_kind(args))


def cmd_doctor(args: argparse.Namespace) -> int:
    from lorad import doctor

    return doctor.main(_layout(args), as_json=args.json, ollama_host=args.ollama_host)


def cmd_install_llama(args: argparse.Namespace) -> int:
    from lorad import native

    return native.install_llama()


def build_parser() -> argparse.ArgumentParser:
    from lorad import __version__
    from lorad.policy import REPORT_SERVICES

    parser = argparse.ArgumentParser(prog="lorad", description="Fine-tune language models from job specs dropped into a folder.")
    parser.add_argument("--version", action="version", version=f"lorad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_root(p: argparse.ArgumentParser, folders: bool = False) -> None:
        p.add_argument("--root", help="lorad root (default: $LORAD_ROOT, else ~/lorad)")
        if folders:
            p.add_argument("--inbox", help="inbox folder (default: ROOT/inbox)")
            p.add_argument("--outbox", help="outbox folder (default: ROOT/outbox)")

    p = sub.add_parser("run", help="run the daemon")
    with_root(p, folders=True)
    p.add_argument("--once", action="store_true", help="process the inbox, drain the queue, exit")
    p.add_argument("--force-polling", action="store_true", help="poll the inbox (network shares)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds a file must stay unchanged before it is claimed")
    p.add_argument("--rescan-interval", type=float, default=30.0, help="seconds between full inbox scans")
    p.add_argument("--rename-delay", type=float, default=0.5,
                   help="seconds between a file's rename into the inbox and its claim (sync tools' bookkeeping)")
    p.add_argument("--allow-read", action="append", metavar="DIR",
                   help="a folder specs may read data and models from (repeatable; adds to ROOT/policy.yaml)")
    p.add_argument("--allow-ollama-host", action="append", metavar="URL",
                   help="an Ollama server specs may send models to, besides the daemon's own (repeatable)")
    p.add_argument("--allow-train-host", action="append", metavar="HOST",
                   help="an SSH host specs may train on (repeatable)")
    p.add_argument("--allow-report-to", action="append", metavar="SERVICE", choices=REPORT_SERVICES,
                   help="a service specs may report training to with train.report_to: wandb or swanlab (repeatable)")
    p.add_argument("--name", help="this daemon's name for specs' runs_on (default: the host name)")
    p.add_argument("--default-daemon", metavar="NAME",
                   help="several daemons share the inbox: the one that runs specs without runs_on (give the same "
                        "NAME to every daemon; default: each runs them, as a daemon alone does)")
    p.add_argument("--retry-backoff", type=float, default=30.0,
                   help="seconds before the first retry of a stage lost to a crash or a kill (doubled each time)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check job specs")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="copy a spec into the inbox")
    p.add_argument("file")
    p.add_argument("--rerun", action="store_true",
                   help="run it even if the same spec was already run (otherwise it is reported as a duplicate)")
    with_root(p, folders=True)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show jobs")
    p.add_argument("job", nargs="?")
    with_root(p, folders=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="refresh every second (active and recent jobs)")
    p.add_argument("--all", action="store_true", help="with --watch: every job, not only active and recent ones")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job")
    with_root(p, folders=True)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("retry", help="queue a failed or cancelled job again; it resumes from its last good stage")
    p.add_argument("job")
    with_root(p, folders=True)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("compare", help="several jobs' settings and metrics side by side (Markdown)")
    p.add_argument("jobs", nargs="+", metavar="JOB", help="job ids, unique prefixes or names")
    p.add_argument("--output", "-o", help="also write the table to this file (e.g. compare.md)")
    with_root(p, folders=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("score", help="score text-to-SQL predictions by executing them")
    p.add_argument("pairs", help="JSONL rows with sql_context, sql (gold) and prediction")
    p.add_argument("--engine", choices=["sqlite", "duckdb"], default="sqlite")
    p.add_argument("--rows", help="write per-row results (match, reason) to this JSONL file")
    p.set_defaults(func=cmd_score)

    for name, func, text in (("install-agent", cmd_install_agent, "install and start the background service"),
                             ("uninstall-agent", cmd_uninstall_agent, "stop and remove the background service"),
                             ("restart-agent", cmd_restart_agent, "restart the background service")):
        p = sub.add_parser(name, help=text)
        kind = p.add_mutually_exclusive_group()
        kind.add_argument("--launchd", action="store_true", help="macOS launchd user agent (default on macOS)")
        kind.add_argument("--systemd", action="store_true", help="systemd user unit (default on Linux)")
        if name != "restart-agent":
            p.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
        if name == "install-agent":
            with_root(p, folders=True)
        p.set_defaults(func=func)

    p = sub.add_parser("doctor", help="check that this machine is ready for the next job")
    with_root(p, folders=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--ollama-host", help="Ollama server to check (default: $OLLAMA_HOST, else 127.0.0.1:11434)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install-llama", help="build and install llama.cpp (llama-cpp-python) with portable CPU flags")
    p.set_defaults(func=cmd_install_llama)

    p = sub.add_parser("demo", help="run jobspecs/demo.yaml end to end")
    with_root(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

"""Two daemons, one inbox: each spec is claimed by exactly one daemon, the one its runs_on names."""

from __future__ import annotations

import json
import os
import time

from conftest import spec_text, statuses, wait_for
from lorad.spec import addressed_to, check_bytes


def test_runs_on_names_a_daemon_or_several(tmp_path):
    head = spec_text("j", tmp_path / "rows.jsonl")
    assert addressed_to(head.encode()) is None
    assert addressed_to((head + "runs_on: studio\n").encode()) == ["studio"]
    assert addressed_to((head + "runs_on: [studio, mini]\n").encode()) == ["studio", "mini"]
    assert addressed_to(b"runs_on: [unclosed\n") is None  # unreadable: the default daemon takes it and rejects it
    assert check_bytes((head + "runs_on: [studio, mini]\n").encode()).ok
    bad = check_bytes((head + "runs_on: '-o ProxyCommand'\n").encode())
    assert not bad.ok and bad.problems[0].path == "$.runs_on"


def test_two_daemons_on_one_inbox_run_each_spec_once_on_the_named_daemon(tmp_path, start_daemon, rows_file):
    shared = tmp_path / "shared-inbox"
    shared.mkdir()
    plan: dict[str, str | list[str] | None] = {}
    for i in range(20):
        plan[f"job{i:02d}"] = ["studio", "mini", ["studio", "mini"], None][i % 4]
    plan["nobody"] = "laptop"  # no such daemon here: both leave it alone
    for name, target in plan.items():
        runs_on = "" if target is None else f"runs_on: {json.dumps(target)}\n"
        tmp = shared / f".{name}.tmp"
        tmp.write_text(spec_text(name, rows_file) + runs_on)
        os.replace(tmp, shared / f"{name}.yaml")
    roots = {n: tmp_path / n for n in ("studio", "mini")}
    daemons = {n: start_daemon("--inbox", str(shared), "--name", n, "--default-daemon", "studio", root=roots[n])
               for n in roots}
    ran = {n: {} for n in roots}

    def all_done() -> bool:
        for n in roots:
            ran[n] = {s.get("name"): s for s in statuses(roots[n] / "outbox").values()}
        return sum(len(r) for r in ran.values()) >= 20 and all(
            s["state"] == "succeeded" for r in ran.values() for s in r.values())

    wait_for(all_done, timeout=120, what="20 jobs to succeed across the two daemons")
    time.sleep(3)  # a second look: nothing more gets claimed
    all_done()
    for name, target in plan.items():
        where = [n for n in roots if name in ran[n]]
        if target == "laptop":
            assert where == [] and (shared / f"{name}.yaml").exists()
            continue
        assert len(where) == 1, (name, where)  # exactly once
        expected = {"studio"} if target is None else {target} if isinstance(target, str) else set(target)
        assert where[0] in expected, (name, target, where)
    # nothing but the 20 jobs in either outbox: no rejected or conflicting entries for the other's specs
    assert sum(len(r) for r in ran.values()) == 20
    for n, d in daemons.items():
        assert "left_for_another_daemon" in d.log
        assert all(s["state"] == "succeeded" for s in ran[n].values())
    # a cancel file for a job neither daemon has is left for whoever has it, not deleted by the first to see it
    (shared / "cancel-someone-elses-job").write_text("")
    time.sleep(3)
    assert (shared / "cancel-someone-elses-job").exists()

"""Distributed LoRA: what a second host costs and buys, measured on two namespaced hosts.

SmolLM2-135M-Instruct (the demo model), LoRA rank 8 on 8 layers (lorad's defaults), global batch 4:
  1 rank  — all four rows on host 0;
  2 ranks — two rows each on host 0 and host 1 (network namespaces joined by a veth, one sshd each,
            started by mlx.launch over SSH with the ring backend, as the lora stage does).
Each step is timed in two parts (bench/distributed_rank.py): compute (forward + backward) and
all_sum (`mlx.nn.average_gradients`, mlx-lm's call). From the measured gradient bytes it writes
the all_sum time expected over Thunderbolt 4 and 10 GbE for this model and for an 8B model
(Llama-3-8B shape) at rank 8, with the assumptions printed beside them.

Both "hosts" share this machine's cores, so the 2-rank compute here is no faster than 1 rank; on
two machines each rank has its own. Needs root (ip netns), sshd and rsync: tests/netns_hosts.py.

    .venv/bin/python bench/distributed.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from lora_speed import prepare  # noqa: E402
from lorad import accel, distributed  # noqa: E402
from netns_hosts import TwoHosts, unavailable  # noqa: E402

RANK = REPO / "bench" / "distributed_rank.py"
# Links: usable TCP bandwidth and the per-step latency cost of the ring all-reduce (a few round trips).
LINKS = {"Thunderbolt 4 bridge (~20 Gb/s usable of 40)": (20e9, 4 * 50e-6),
         "10 GbE (~9.4 Gb/s usable)": (9.4e9, 4 * 100e-6)}


def lora_params(hidden: int, kv: int, inter: int, layers: int, rank: int = 8) -> int:
    """LoRA parameters when every linear of `layers` blocks gets rank-r adapters (mlx-lm's default keys)."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),  # q, k, v, o
              (hidden, inter), (hidden, inter), (inter, hidden)]  # gate, up, down
    return layers * sum(rank * (i + o) for i, o in shapes)


def ring_seconds(grad_bytes: int, world: int, bandwidth_bits: float, latency: float) -> float:
    """A ring all-reduce sends 2 (N-1)/N of the buffer from each rank."""
    return 2 * (world - 1) / world * grad_bytes * 8 / bandwidth_bits + latency


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"cannot make two hosts here: {why}")
    work = Path(tempfile.mkdtemp(prefix="lorad-bench-dist-"))
    cache = work / "cache"
    base = prepare(work, cache)
    env = {**os.environ, **accel.blas_env(cache), "PYTHONPATH": str(REPO / "daemon")}
    hosts = TwoHosts(work / "hosts")
    (work / "hosts").mkdir()
    hosts.up()
    try:
        hosts.wait_ssh(1)
        one = work / "one.json"
        subprocess.run([*hosts.prefix(0), sys.executable, str(RANK), str(base), str(work / "data"), str(one),
                        "--steps", str(args.steps)], env=env, check=True)
        two = work / "two.json"
        hostfile = work / "hostfile.json"
        make = ("import json, sys; from lorad import distributed as d; "  # on host 0, where its address is local
                f"print(json.dumps(d.hostfile({hosts.addrs!r}, 'ring', d.forwarded_env())))")
        one_thread = {**env, "OPENBLAS_NUM_THREADS": "1"}  # two ranks share 2 cores here: one each
        hostfile.write_text(subprocess.run([*hosts.prefix(0), sys.executable, "-c", make], env=one_thread, check=True,
                                           capture_output=True, text=True).stdout)
        launcher = Path(sys.executable).parent / "mlx.launch"
        os.environ["PATH"] = hosts.env(dict(os.environ))["PATH"]  # lorad's ssh wraps the one with the test key
        bin_dir = distributed.ssh_wrapper(work / "bin")
        run_env = hosts.env(one_thread)
        run_env["PATH"] = f"{bin_dir}{os.pathsep}{run_env['PATH']}"
        subprocess.run([*hosts.prefix(0), str(launcher), "--hostfile", str(hostfile), "--backend", "ring",
                        "--python", sys.executable, "--starting-port", str(distributed.free_port_base(2)),
                        "--cwd", str(work), str(RANK), str(base), str(work / "data"), str(two),
                        "--steps", str(args.steps)], env=run_env, check=True, stdin=subprocess.DEVNULL)
    finally:
        hosts.down()
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    c1, c2, a2 = median(r1["steps"], "compute_s"), median(r2["steps"], "compute_s"), median(r2["steps"], "all_sum_s")
    w2 = median(r2["steps"], "wait_s")
    grad = r2["grad_bytes"]
    print(f"SmolLM2-135M, LoRA rank 8 on 8 layers: {r2['grad_params']:,} trainable parameters, "
          f"{grad / 2**20:.2f} MiB of gradients per all_sum\n")
    print("| ranks | compute per step | waiting for the other rank | all_sum per step |\n|---|---|---|---|")
    print(f"| 1 (batch 4 on one host, 2 BLAS threads) | {c1 * 1000:.0f} ms | — | — |")
    print(f"| 2 (batch 2 each, 1 BLAS thread each, veth between namespaces) | {c2 * 1000:.0f} ms | "
          f"{w2 * 1000:.1f} ms | {a2 * 1000:.1f} ms |")
    print(f"\nmeasured all_sum over the veth: {grad * 8 / a2 / 1e9:.2f} Gb/s effective\n")
    big = lora_params(4096, 1024, 14336, 8) * 4  # float32 gradients
    print("| model | link | all_sum per step (expected) | 2-rank step, from 1-rank compute here |\n|---|---|---|---|")
    for name, size, compute in (("SmolLM2-135M", grad, c1 / 2), ("8B (Llama-3-8B shape)", big, None)):
        for link, (bw, lat) in LINKS.items():
            t = ring_seconds(size, 2, bw, lat)
            step = f"{(compute + t) * 1000:.0f} ms (vs {c1 * 1000:.0f} ms on one)" if compute else "compute: not measurable here"
            print(f"| {name} ({size / 2**20:.1f} MiB) | {link} | {t * 1000:.2f} ms | {step} |")
    print(json.dumps({"one_rank": r1, "two_ranks": r2, "eight_b_grad_bytes": big}), file=open(work / "result.json", "w"))
    print(f"\nraw: {work / 'result.json'}")


if __name__ == "__main__":
    main()

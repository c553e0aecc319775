"""evaluate for every data format: loss and perplexity from each runtime's logits, generation metrics, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tinymodel
from lorad.evalmetrics import bootstrap_ci, generation_summary, loss_summary, row_scores
from lorad.report import pick_examples, smoothed
from test_stages import make_spec, run_stage, write_rows

ITEMS = ["city", "price", "name", "year", "total", "value"]


def pattern_row(fmt: str, i: int) -> dict:
    """A question whose answer follows one learnable pattern: the base model cannot know it, training teaches it."""
    word, n = ITEMS[i % len(ITEMS)], (7 * i) % 97  # no two rows alike below i = 582
    question, answer = f"show the {word} of {n}", f"select {word} from table where id {n};"
    if fmt == "chat":
        return {"messages": [{"role": "system", "content": "answer in sql"}, {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]}
    if fmt == "text":
        return {"text": f"{question} means {answer}"}
    return {"prompt": question, "completion": answer}


def run_job(tmp_path: Path, rows: list[dict], stages: tuple[str, ...], **train) -> tuple[Path, dict]:
    tiny = tinymodel.make_tiny_model(tmp_path / "tiny")
    data = write_rows(tmp_path / "rows.jsonl", rows)
    # a full fine-tune: a 64-wide random model learns the pattern in ~150 steps (LoRA at this width needs thousands)
    spec = make_spec(f"path:{tiny}", f"path:{data}", **{"iters": 150, "learning_rate": 3e-3, "batch_size": 4,
                                                        "eval_every": 50, "save_every": 1000, "max_seq_length": 128, **train})
    spec["train"]["method"] = "full"
    spec["data"]["test_fraction"] = 0.1
    spec["gguf"] = {"outtype": "f16"}
    spec["evaluate"] = {"limit": 12}
    job = tmp_path / "job"
    artifacts: dict = {}
    for stage in stages:
        artifacts.update(run_stage(stage, job, tmp_path / "cache", spec))
    return job, artifacts


@pytest.mark.parametrize("fmt", ["chat", "completions", "text"])
def test_evaluate_measures_every_format_and_the_fine_tune_beats_its_base(tmp_path, fmt):
    job, artifacts = run_job(tmp_path, [pattern_row(fmt, i) for i in range(120)],
                             ("prepare", "convert", "lora", "fuse", "gguf", "evaluate"))
    result = json.loads((job / "eval.json").read_text())
    assert result["format"] == fmt and result["split"] == "test" and result["rows"] == 12
    assert result["runtimes"] == {"base": "MLX", "finetuned": "MLX", "gguf": "llama.cpp"}
    expected = {"loss", "chrf", "rouge_l"} | ({"exact_match"} if fmt != "text" else set())
    assert set(result["metrics"]) == expected
    for model in ("base", "finetuned", "gguf"):
        s = result[model]
        assert s["tokens"] > 0 and s["perplexity"] > 1 and s["loss_ci95"][0] <= s["loss"] <= s["loss_ci95"][1]
        for metric in expected - {"loss"}:
            assert 0 <= s[metric]["ci95"][0] <= s[metric]["value"] <= s[metric]["ci95"][1] <= 1
        assert 0 <= s["did_not_stop"]["count"] <= result["rows"]
    base, tuned, gguf = result["base"], result["finetuned"], result["gguf"]
    # the fine-tune learned the pattern: lower held-out loss and answers closer to the references
    assert tuned["loss"] < base["loss"] - 1.0, (tuned["loss"], base["loss"])
    assert tuned["chrf"]["value"] > base["chrf"]["value"] + 0.2, (tuned["chrf"], base["chrf"])
    assert tuned["rouge_l"]["value"] > base["rouge_l"]["value"] + 0.2
    # llama.cpp's own logits give the f16 GGUF the same loss as MLX (two independent computations)
    assert abs(gguf["loss"] - tuned["loss"]) < 0.02 * tuned["loss"] + 0.01
    assert result["deltas"]["finetuned_minus_base"]["loss"] < -1.0
    rows = [json.loads(x) for x in (job / "eval_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"prediction", "hit_limit", "chrf", "loss"} <= set(r["gguf"]) for r in rows)
    report = (job / "report.md").read_text()
    assert "## Results" in report and "did not stop" in report and "## Where the fine-tune won" in report
    assert "## Execution accuracy" not in report
    for plot in ("loss_plot", "metrics_plot"):
        assert (job / artifacts[plot]).read_bytes()[:4] == b"\x89PNG"


def test_the_answer_length_comes_from_the_data_so_a_long_gold_query_can_match(tmp_path):
    """A gold query of ~100 tokens (the old fixed limit was 76): a model trained to write it is matched."""
    context = ("create table sales (name text, city text, price int, year int, total int); "
               "insert into sales values ('a', 'paris', 20, 2001, 50), ('b', 'paris', 30, 2005, 60), ('c', 'rome', 5, 1999, 1);")
    gold = ("select name, city, price, year, total, price * total as value from sales where city = 'paris' and year > 2000 "
            "and price > 10 and total < 100 and name is not null order by price desc, name asc, year desc limit 5;")
    row = {"prompt": "list the paris sales\nSQL:", "completion": gold, "sql_context": context, "sql": gold}
    job = tmp_path / "job"
    (job / "data").mkdir(parents=True)
    for split, copies in (("train", 8), ("valid", 2), ("test", 1)):
        write_rows(job / "data" / f"{split}.jsonl", [row] * copies)
    tiny = tinymodel.make_tiny_model(tmp_path / "tiny")
    spec = make_spec(f"path:{tiny}", f"path:{job / 'data'}", iters=300, learning_rate=3e-3, batch_size=2, eval_every=1000,
                     save_every=1000, max_seq_length=256)
    spec["train"]["method"] = "full"
    for stage in ("convert", "lora", "fuse", "evaluate"):
        run_stage(stage, job, tmp_path / "cache", spec)
    from mlx_lm.utils import load_tokenizer

    gold_tokens = len(load_tokenizer(tiny).encode(gold, add_special_tokens=False))
    result = json.loads((job / "eval.json").read_text())
    assert gold_tokens > 76 and result["max_new_tokens"] > gold_tokens
    assert result["max_new_tokens_from"].startswith(f"longest reference ({gold_tokens} tokens)")
    tuned = result["finetuned"]
    assert tuned["execution_accuracy"] == 1.0 and tuned["exact_match"]["value"] == 1.0, tuned
    assert tuned["did_not_stop"]["count"] == 0 and result["base"]["execution_accuracy"] == 0.0
    assert "## Execution accuracy" in (job / "report.md").read_text()


def test_evaluate_max_new_tokens_from_the_spec_counts_answers_that_run_to_the_limit(tmp_path):
    job, _ = run_job(tmp_path, [pattern_row("completions", i) for i in range(60)],
                     ("prepare", "convert", "evaluate"))
    spec_limited = make_spec(f"path:{tmp_path / 'tiny'}", f"path:{tmp_path / 'rows.jsonl'}", max_seq_length=128)
    spec_limited["data"]["test_fraction"] = 0.1
    spec_limited["evaluate"] = {"max_new_tokens": 3, "metrics": ["chrf", "bleu"]}
    run_stage("evaluate", job, tmp_path / "cache", spec_limited)
    result = json.loads((job / "eval.json").read_text())
    assert result["max_new_tokens"] == 3 and result["max_new_tokens_from"] == "evaluate.max_new_tokens"
    assert result["metrics"] == ["chrf", "bleu"] and "loss" not in result["base"]
    # a random base model never says its end-of-turn token within 3 tokens: every answer hit the limit
    assert result["base"]["did_not_stop"] == {"count": result["rows"], "rate": 1.0}
    assert "bleu" in result["base"] and "exact_match" not in result["base"]


def test_metrics_are_the_libraries_numbers_with_intervals():
    from sacrebleu.metrics import CHRF

    assert row_scores("select a from t", "select a  from t", ["exact_match"]) == {"exact_match": 1.0}
    s = row_scores("select a from t", "select b from t", ["chrf", "rouge_l"])
    assert s["chrf"] == pytest.approx(CHRF().sentence_score("select a from t", ["select b from t"]).score / 100, abs=1e-4)
    assert s["rouge_l"] == pytest.approx(0.75)  # 3 of 4 words in order
    preds, refs = ["a b c", "x y", "a b c d"], ["a b c", "x z", "d c b a"]
    scores = [row_scores(p, r, ["exact_match", "chrf", "rouge_l"]) for p, r in zip(preds, refs)]
    summary = generation_summary(preds, refs, scores, ["exact_match", "chrf", "rouge_l", "bleu"])
    assert summary["exact_match"]["matches"] == 1 and summary["exact_match"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    for m in ("chrf", "rouge_l", "bleu"):
        lo, hi = summary[m]["ci95"]
        assert 0 <= lo <= hi <= 1
    # perplexity is exp of the token-weighted mean NLL, and its interval is the loss interval's
    loss = loss_summary([2.0, 6.0], [1, 3])
    assert loss["loss"] == 2.0 and loss["perplexity"] == pytest.approx(7.389, abs=1e-3) and loss["tokens"] == 4
    assert bootstrap_ci(1, lambda idx: 0.0) is None


def test_report_examples_are_the_biggest_wins_and_losses_not_the_first_rows():
    rows = [{"question": f"q{i}", "reference": "r", "base": {"prediction": "x", "chrf": b}, "finetuned": {"prediction": "y", "chrf": f}}
            for i, (b, f) in enumerate([(0.5, 0.5), (0.1, 0.2), (0.0, 0.9), (0.8, 0.1), (0.3, 0.6), (0.5, 0.4)])]
    wins, losses = pick_examples(rows, k=2)
    assert [r["question"] for r in wins] == ["q2", "q4"] and [r["question"] for r in losses] == ["q3", "q5"]
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull toward 0 at the start


def test_compare_two_finished_jobs_side_by_side(tmp_path, start_daemon, lorad_env):
    """Two learning rates through a real daemon, then `lorad compare` — what a user does next."""
    import subprocess
    import sys

    from conftest import statuses, wait_for

    tiny = tinymodel.make_tiny_model(tmp_path / "tiny")
    data = write_rows(tmp_path / "rows.jsonl", [pattern_row("completions", i) for i in range(60)])
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    for name, lr in (("slow", "1e-5"), ("fast", "3e-3")):
        (root / "inbox" / f"{name}.yaml").write_text(
            f"version: 1\nname: {name}\nmodel: {{source: 'path:{tiny}'}}\ndata: {{source: 'path:{data}', test_fraction: 0.15}}\n"
            f"train: {{method: full, iters: 60, batch_size: 4, learning_rate: {lr}, num_layers: 2, max_seq_length: 128, eval_every: 30}}\n"
            "evaluate: {limit: 8}\nstages: [prepare, convert, lora, evaluate]\n")
    daemon = start_daemon(root=root)
    wait_for(lambda: len(statuses(root / "outbox")) == 2 and all(s["state"] in ("succeeded", "failed")
                                                                 for s in statuses(root / "outbox").values()),
             timeout=240, what="both jobs to finish")
    assert [s["state"] for s in statuses(root / "outbox").values()] == ["succeeded", "succeeded"], daemon.log[-3000:]
    out = tmp_path / "compare.md"
    run = subprocess.run([sys.executable, "-m", "lorad", "compare", "slow", "fast", "--root", str(root), "-o", str(out)],
                         env=lorad_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    table = run.stdout
    assert out.read_text() == "# lorad compare\n\n" + table
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines() if line.startswith("| ")}
    assert lines["learning rate •"] == ["1e-05", "0.003"] and lines["iterations"] == ["60", "60"]
    assert lines["state"] == ["succeeded", "succeeded"]
    loss = lines["fine-tuned (MLX): held-out loss"]
    results = {s["name"]: json.loads((root / "outbox" / job / "eval.json").read_text()) for job, s in statuses(root / "outbox").items()}
    assert loss == [f"{results['slow']['finetuned']['loss']:.3f}", f"**{results['fast']['finetuned']['loss']:.3f}**"]
    assert "fine-tuned (MLX): chrF" in lines and lines["base model: held-out loss"][0] == lines["base model: held-out loss"][1]  # same base: no bold
    missing = subprocess.run([sys.executable, "-m", "lorad", "compare", "slow", "nosuchjob", "--root", str(root)],
                             env=lorad_env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no job 'nosuchjob'" in missing.stderr


def support_row(fmt: str, i: int) -> dict:
    """Customer-support turns with one house style the base model cannot guess."""
    team = ["billing", "shipping", "returns", "accounts"][i % 4]
    question = f"My order {1000 + 7 * i} has a problem with {team}. Can you help?"
    answer = f"Ticket {1000 + 7 * i} is open. The {team} team will reply within one day."
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return {"prompt": question, "completion": answer}


@pytest.mark.parametrize("fmt", ["chat", pytest.param("completions", marks=pytest.mark.slow)])
def test_the_demo_model_fine_tuned_on_support_chat_beats_its_base_in_mlx_and_in_llama_cpp(tmp_path, fmt, start_daemon):
    """SmolLM2-135M (the demo base, from its GGUF) learns a house style; the daemon measures all three models.

    Run by a real daemon: its stage processes load OpenBLAS before MLX (a test process does not, and
    a 135M model on MLX's reference BLAS runs at ~2 tokens/s).
    """
    data = write_rows(tmp_path / "rows.jsonl", [support_row(fmt, i) for i in range(80)])
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    (root / "inbox" / "support.yaml").write_text(
        f"version: 1\nname: support\nmodel: {{source: demo}}\ndata: {{source: 'path:{data}', test_fraction: 0.1}}\n"
        "train: {iters: 30, batch_size: 4, learning_rate: 3.0e-4, num_layers: 4, max_seq_length: 128, eval_every: 30}\n"
        "gguf: {outtype: f16}\nevaluate: {limit: 8}\nstages: [prepare, convert, lora, fuse, gguf, evaluate]\n")
    daemon = start_daemon("--once", root=root)
    assert daemon.wait(timeout=600) == 0, daemon.log
    (job,) = (root / "outbox").iterdir()
    assert json.loads((job / "status.json").read_text())["state"] == "succeeded", daemon.log[-3000:]
    result = json.loads((job / "eval.json").read_text())
    assert result["format"] == fmt and result["runtimes"] == {"base": "llama.cpp", "finetuned": "MLX", "gguf": "llama.cpp"}
    base, tuned, gguf = result["base"], result["finetuned"], result["gguf"]
    assert tuned["loss"] < base["loss"] - 0.5 and tuned["chrf"]["value"] > base["chrf"]["value"] + 0.15, (base, tuned)
    assert abs(gguf["loss"] - tuned["loss"]) < 0.05 * tuned["loss"] + 0.02 and gguf["chrf"]["value"] > base["chrf"]["value"]
    assert (job / "report.md").exists() and (job / "metrics.png").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_held_out_losses_equal_one_row_at_a_time_with_the_full_head(tmp_path, arch):
    """mlx_losses batches rows and scores only their completions, with cpu_ops: the numbers of the plain way."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load

    from lorad.stages.evaluate import mlx_losses, sequence_losses

    model, _ = load(str(tinymodel.make_tiny_model(tmp_path / arch, arch)))
    rng = __import__("random").Random(0)
    sequences = [([rng.randrange(1, 300) for _ in range(rng.randint(2, 60))], rng.randint(0, 30)) for _ in range(21)]
    sequences.append(([5], 0))  # nothing to score

    def nll(tokens: list[int], start: int) -> float:
        x = mx.array([tokens])
        return nn.losses.cross_entropy(model(x[:, :-1])[0][start:], x[0, start + 1:]).sum().item()

    expected = sequence_losses(sequences, nll)
    got = mlx_losses(model, sequences)
    assert [n for _, n in got] == [n for _, n in expected] and sum(n for _, n in got) > 200
    for (value, _), (reference, _) in zip(got, expected):
        assert abs(value - reference) < 1e-4 * max(1.0, abs(reference))

"""`lorad validate` and the spec loader: every problem, with file, line, column and path."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorad.spec import MAX_SPEC_BYTES, apply_defaults, check_bytes, load_schema

REPO = Path(__file__).resolve().parents[1]


def validate(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorad", "validate", *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def test_example_specs_are_valid():
    specs = sorted((REPO / "jobspecs").glob("*.yaml"))
    assert specs
    out = validate(*specs)
    assert out.returncode == 0, out.stdout


def test_all_problems_are_reported_with_positions(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 2\n"
        "name: Bad Name\n"
        "model: {source: foo}\n"
        "data:\n"
        "  source: builtin:text-to-sql\n"
        "  limt: 3\n"
        "train:\n"
        "  iters: -1\n"
        "  iters: 5\n"
        "stages: [lora, prepare]\n"
    )
    out = validate(bad)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines == [
        f"{bad}:1:10: $.version: must be 1, not 2",
        f"{bad}:2:7: $.name: 'Bad Name' is not valid here; expected Short job name: lower-case letters, digits, '.', '_' and '-'; used for the Ollama model name when ollama.model is not given.",
        f"{bad}:3:17: $.model.source: 'foo' is not valid here; expected demo | hf:<repo-id> | path:<dir or .gguf> | ollama:<name[:tag]>",
        f"{bad}:6:3: $.data.limt: unknown key 'limt'; expected one of: format, limit, seed, source, test_fraction, valid_fraction, with_context",
        f"{bad}:8:10: $.train.iters: -1 is less than the minimum of 1",
        f"{bad}:9:3: $.train.iters: duplicate key 'iters'",
        f"{bad}:10:9: $.stages: stages must be in pipeline order: prepare, convert, lora, fuse, gguf, ollama, evaluate",
    ]


def test_missing_required_keys_point_at_their_parent(tmp_path):
    result = check_bytes(b"version: 1\nname: x\nmodel:\n  quantize: {bits: 4}\n")
    assert [(p.path, p.line) for p in result.problems] == [("$.data", 1), ("$.model.source", 4)]


@pytest.mark.parametrize("data, needle, line", [
    (b"", "empty file", 1),
    (b"   \n\n", "empty file", 1),
    (b"a: 1\n---\nb: 2\n", "more than one YAML document", 2),
    (b"name: x\n\xff\xfe\n", "not UTF-8", 2),
    (b"a: !!python/object/apply:os.system ['echo hi']\n", "not allowed", 1),
    (b"a: [1, 2\nb: 3\n", "YAML syntax error", 2),
    (b"- just\n- a list\n", "YAML mapping", 1),
])
def test_unreadable_specs_get_one_clear_problem(data, needle, line):
    result = check_bytes(data)
    assert not result.ok and len(result.problems) == 1
    assert needle in result.problems[0].message and result.problems[0].line == line


def test_alias_bomb_is_refused_fast():
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    t0 = time.monotonic()
    result = check_bytes("\n".join(levels).encode())
    assert time.monotonic() - t0 < 2
    assert "alias bomb" in result.problems[0].message


def test_oversized_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    out = validate(big)
    assert out.returncode == 1 and "limited to" in out.stdout


def test_defaults_fill_every_section():
    spec = apply_defaults({"version": 1, "name": "x", "model": {"source": "demo"}, "data": {"source": "builtin:text-to-sql"}})
    assert spec["train"]["iters"] == 200 and spec["train"]["lora"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    assert spec["train"]["early_stopping"]["patience"] == 3
    assert spec["gguf"]["outtype"] == "q8_0" and spec["evaluate"]["engine"] == "sqlite"
    assert spec["stages"] == ["prepare", "convert", "lora", "fuse", "gguf", "ollama", "evaluate"]
    assert "quantize" not in spec["model"] and "distributed" not in spec["train"]
    assert load_schema()["$schema"].endswith("2020-12/schema")

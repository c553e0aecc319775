"""Job specs: safe YAML parsing with positions, JSON Schema validation, defaults.

Every problem is reported with the file, line, column and JSON path of the node
it concerns, and all problems are reported at once, so a user fixes a spec in
one round trip.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from lorad import resources

MAX_SPEC_BYTES = 1 << 20
MAX_NODES = 10_000  # bounds alias expansion ("billion laughs")
MAX_DEPTH = 32  # a job spec nests 4 deep; deeper is an attack on the recursive parser
STAGE_ORDER = ["prepare", "convert", "lora", "fuse", "gguf", "ollama", "evaluate"]
FLOAT_KEYS = {"learning_rate", "scale", "dropout", "valid_fraction", "test_fraction", "weight_decay", "warmup_ratio"}
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
SAFE_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
}


SCHEMA_PATH = resources.path(resources.SCHEMA)


@dataclass
class Problem:
    path: str  # JSON path, "$" for the document
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def format(self, filename: str) -> str:
        where = f"{filename}:{self.line or 0}:{self.column or 0}"
        return f"{where}: {self.path}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "column": self.column, "message": self.message}


@dataclass
class SpecResult:
    spec: dict[str, Any] | None  # with defaults applied; None when invalid
    raw: dict[str, Any] | None = None  # as written
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class SpecError(Exception):
    """A spec that cannot be read at all (one problem, with its position)."""

    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


_schema_cache: dict[str, Any] = {}


def load_schema() -> dict[str, Any]:
    if "schema" not in _schema_cache:
        _schema_cache["schema"] = json.loads(SCHEMA_PATH.read_text())
    return _schema_cache["schema"]


def _pos(mark: yaml.Mark | None) -> tuple[int | None, int | None]:
    return (mark.line + 1, mark.column + 1) if mark else (None, None)


def _json_path(parts: list[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError(Problem("$", f"not UTF-8 text (byte 0x{data[e.start]:02x})", line, col)) from None


def _nesting_depth(text: str) -> tuple[int, int]:
    """Deepest run of flow brackets, and the line it reaches, without parsing (PyYAML recurses per level)."""
    depth = deepest = 0
    line = where = 1
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif ch in "]}":
            depth = max(depth - 1, 0)
        elif ch == "\n":
            line += 1
    return deepest, where


def _compose(text: str) -> yaml.Node:
    depth, deepest_line = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise SpecError(Problem("$", f"nested {depth} levels deep; a job spec nests at most {MAX_DEPTH}", deepest_line, 1))
    try:
        loader = yaml.SafeLoader(text)  # the reader checks every character here (NUL, other control codes)
    except yaml.reader.ReaderError as e:
        before = text[: e.position]
        at_line, at_col = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(Problem("$", f"character U+{code:04X} is not allowed in a YAML file (a binary file?)",
                                at_line, at_col)) from None
    try:
        node = loader.get_single_node()
    except yaml.composer.ComposerError as e:
        line, col = _pos(e.problem_mark)
        msg = "more than one YAML document; a job spec is one document" if "single document" in str(e.context) else str(e.problem)
        raise SpecError(Problem("$", msg, line, col)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line, col = _pos(mark)
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise SpecError(Problem("$", f"YAML syntax error: {problem}", line, col)) from None
    except RecursionError:
        raise SpecError(Problem("$", "nested too deeply for a job spec")) from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError(Problem("$", "empty file: a job spec needs at least version, name, model and data", 1, 1))
    return node


class _Builder:
    """Turns a composed YAML node tree into Python data, recording positions.

    Only safe scalar tags are accepted; duplicate keys and alias blow-ups are errors.
    """

    def __init__(self) -> None:
        self.positions: dict[str, tuple[int | None, int | None]] = {}
        self.key_positions: dict[str, tuple[int | None, int | None]] = {}
        self.nodes = 0
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, parts: list[Any]) -> Any:
        self.nodes += 1
        if len(parts) > MAX_DEPTH:  # also stops an alias that refers to itself (x: &a [*a])
            line, col = _pos(node.start_mark)
            raise SpecError(Problem(_json_path(parts[:4]) + "…", f"nested more than {MAX_DEPTH} levels deep "
                                    "(a YAML alias that contains itself?)", line, col))
        if self.nodes > MAX_NODES:
            line, col = _pos(node.start_mark)
            raise SpecError(Problem(_json_path(parts), f"document expands to more than {MAX_NODES} nodes (YAML alias bomb?)", line, col))
        path = _json_path(parts)
        self.positions.setdefault(path, _pos(node.start_mark))
        if node.tag not in SAFE_TAGS:
            line, col = _pos(node.start_mark)
            raise SpecError(Problem(path, f"YAML tag {node.tag!r} is not allowed (only plain data)", line, col))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, parts + ["<key>"])
                if not isinstance(key, str):
                    key = str(key)
                kpath = _json_path(parts + [key])
                if key in out:
                    line, col = _pos(key_node.start_mark)
                    self.problems.append(Problem(kpath, f"duplicate key {key!r}", line, col))
                    continue
                self.key_positions[kpath] = _pos(key_node.start_mark)
                out[key] = self.build(value_node, parts + [key])
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, parts + [i]) for i, child in enumerate(node.value)]
        value = self._constructor.construct_object(node, deep=True)
        if isinstance(value, float) and not math.isfinite(value):
            line, col = _pos(node.start_mark)
            raise SpecError(Problem(path, f"{node.value!r} is not a finite number", line, col))
        if isinstance(value, str) and parts and parts[-1] in FLOAT_KEYS and _FLOAT_RE.match(value):
            value = float(value)  # YAML 1.1 reads 5e-4 as a string; mlx-lm's config loader accepts it as a number
        if hasattr(value, "isoformat"):  # dates become strings: JSON has no dates
            value = value.isoformat()
        return value


def parse_bytes(data: bytes) -> tuple[dict[str, Any], _Builder]:
    """Bytes → (document, position index). Raises SpecError when unreadable."""
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(Problem("$", f"file is {len(data)} bytes; job specs are limited to {MAX_SPEC_BYTES} bytes"))
    if not data.strip():
        raise SpecError(Problem("$", "empty file: a job spec needs at least version, name, model and data", 1, 1))
    text = _decode(data)
    node = _compose(text)
    builder = _Builder()
    doc = builder.build(node, [])
    if not isinstance(doc, dict):
        line, col = _pos(node.start_mark)
        raise SpecError(Problem("$", f"a job spec is a YAML mapping, not a {type(doc).__name__}", line, col))
    return doc, builder


def _locate(builder: _Builder, parts: list[Any], key: bool = False) -> tuple[int | None, int | None]:
    """Position of the deepest node along parts that exists (its key's position when key=True)."""
    for cut in range(len(parts), -1, -1):
        path = _json_path(parts[:cut])
        index = (builder.key_positions, builder.positions) if key else (builder.positions, builder.key_positions)
        for positions in index:
            if path in positions:
                return positions[path]
    return (None, None)


def _message(err: Any) -> str:
    """jsonschema's message, made readable for the validators users trip over most."""
    if err.validator == "pattern":
        hint = err.schema.get("description") or f"a string matching {err.validator_value}"
        return f"{err.instance!r} is not valid here; expected {hint}"
    if err.validator == "const":
        return f"must be {err.validator_value!r}, not {err.instance!r}"
    if err.validator == "enum":
        return f"{err.instance!r} is not one of: {', '.join(map(str, err.validator_value))}"
    return err.message


def _schema_problems(doc: dict[str, Any], builder: _Builder) -> list[Problem]:
    validator = Draft202012Validator(load_schema())
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        parts = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = set(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - known):
                line, col = _locate(builder, parts + [key], key=True)
                hint = f"; expected one of: {', '.join(sorted(known))}" if known else ""
                problems.append(Problem(_json_path(parts + [key]), f"unknown key {key!r}{hint}", line, col))
            continue
        if err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            line, col = _locate(builder, parts)
            for key in missing:
                problems.append(Problem(_json_path(parts + [key]), f"required key {key!r} is missing", line, col))
            continue
        line, col = _locate(builder, parts)
        problems.append(Problem(_json_path(parts), _message(err), line, col))
    return problems


def _order_problems(doc: dict[str, Any], builder: _Builder) -> list[Problem]:
    stages = doc.get("stages")
    if not isinstance(stages, list) or not all(s in STAGE_ORDER for s in stages):
        return []
    if len(set(stages)) != len(stages):
        return []  # the schema already reported it
    if stages != sorted(stages, key=STAGE_ORDER.index):
        line, col = _locate(builder, ["stages"])
        return [Problem("$.stages", f"stages must be in pipeline order: {', '.join(STAGE_ORDER)}", line, col)]
    return []


def _train_problems(doc: dict[str, Any], full: dict[str, Any], builder: _Builder) -> list[Problem]:
    """What the schema cannot say: the batch divides among hosts; checkpoints land on optimizer updates.

    full: the train section with defaults applied."""
    from lorad.distributed import check_batch

    train = doc.get("train") or {}
    out = []
    hosts = (train.get("distributed") or {}).get("hosts")
    message = check_batch(full["batch_size"], hosts) if hosts else None
    if message:
        line, col = _locate(builder, ["train", "batch_size"] if "batch_size" in train else ["train", "distributed"])
        out.append(Problem("$.train.batch_size", message, line, col))
    min_hosts = (train.get("distributed") or {}).get("min_hosts")
    if hosts and isinstance(min_hosts, int) and min_hosts > len(hosts):
        line, col = _locate(builder, ["train", "distributed", "min_hosts"])
        out.append(Problem("$.train.distributed.min_hosts", f"min_hosts ({min_hosts}) is more than the "
                           f"{len(hosts)} hosts listed", line, col))
    accumulate = full["grad_accumulation_steps"]
    if full["save_every"] % accumulate:
        line, col = _locate(builder, ["train", "save_every"] if "save_every" in train else ["train", "grad_accumulation_steps"])
        out.append(Problem("$.train.save_every", f"save_every ({full['save_every']}) must be a multiple of "
                           f"grad_accumulation_steps ({accumulate}): a checkpoint between updates would lose the "
                           "gradients gathered so far", line, col))
    schedule = train.get("lr_schedule")
    if isinstance(schedule, dict) and schedule.get("name") in ("exponential_decay", "step_decay") and not schedule.get("arguments"):
        line, col = _locate(builder, ["train", "lr_schedule", "name"])
        out.append(Problem("$.train.lr_schedule.arguments", f"{schedule['name']} needs its arguments "
                           "(e.g. exponential_decay: [learning_rate, decay_rate]; step_decay: [learning_rate, "
                           "decay_rate, step_size])", line, col))
    return out


def apply_defaults(doc: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of doc with every schema default filled in, sections included."""
    schema = schema if schema is not None else load_schema()
    out = copy.deepcopy(doc)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict):
            out[key] = apply_defaults(out[key], sub)
    return out


def _policy_problems(doc: dict[str, Any], builder: _Builder, policy: Any) -> list[Problem]:
    from lorad.policy import spec_problems

    out = []
    for parts, message in spec_problems(doc, policy):
        line, col = _locate(builder, parts)
        out.append(Problem(_json_path(parts), message, line, col))
    return out


def check_bytes(data: bytes, policy: Any = None) -> SpecResult:
    """Parse and validate (and, given the daemon's policy, check what the spec asks for); never raises."""
    try:
        doc, builder = parse_bytes(data)
    except SpecError as e:
        return SpecResult(None, None, [e.problem])
    problems = builder.problems + _schema_problems(doc, builder) + _order_problems(doc, builder)
    full = apply_defaults(doc) if not problems else None
    problems += _train_problems(doc, full["train"], builder) if full is not None else []
    problems += _policy_problems(doc, builder, policy) if policy is not None and not problems else []
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    if problems or full is None:
        return SpecResult(None, doc, problems)
    return SpecResult(full, doc, [])


def addressed_to(data: bytes) -> list[str] | None:
    """The daemon names in a spec's `runs_on`, read with the same limits as any spec; None when it has
    none or cannot be read (the default daemon takes those, and rejects what is invalid)."""
    try:
        doc, _ = parse_bytes(data)
    except SpecError:
        return None
    value = doc.get("runs_on") if isinstance(doc, dict) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def check_file(path: Path) -> SpecResult:
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:  # do not read a huge file just to refuse it
            return SpecResult(None, None, [Problem("$", f"file is {size} bytes; job specs are limited to {MAX_SPEC_BYTES} bytes")])
        data = path.read_bytes()
    except OSError as e:
        return SpecResult(None, None, [Problem("$", f"cannot read file: {e.strerror or e}")])
    return check_bytes(data)

"""The docs say what the code does: README.md and docs/*.md checked against the package.

- Every Python block parses, names only functions that exist and calls them with
  arguments their signatures take. A block whose first line is ``# Illustration...``
  needs a real model or the reader's files and is only checked; every other block runs,
  in page order, in one namespace per page (as a notebook would), in a scratch directory.
- Every JSON record example loads as a record.
- Every ``sparcom ...`` command line parses (commands, flags) and its KEY=VALUE overrides
  name real config keys of the config it points at.
- The config schema in docs/cli.md and the TrainConfig table in docs/training.md state
  the code's defaults.
- Every config key the prose names in backticks (`ablation.n_random`, `data.max_length=256`)
  exists, unless listed as a summary.json key or other name in NOT_CONFIG.
- Every repository path the prose names (`tests/...`, `scripts/...`, `models/moe.py`) exists,
  a `file.py: Name` is defined there, and every `...Error` / `...Warning` named is a real type.
- Every keyword of a call written inline in the prose (`load_model(path, dtype="float32")`)
  is one that a sparcom_jax function of that name takes, with its default as the value.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ILLUSTRATION = "# Illustration"


def blocks(lang: str) -> list[tuple[str, int, str]]:
    """(page, line, code) of every fenced block of language `lang` ("" for unmarked)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                out.append((page.name, text.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


PYTHON = blocks("python")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError names what is missing
        return obj
    raise ImportError(dotted)


class _ApiCheck(ast.NodeVisitor):
    """Collects the problems of one block: sparcom_jax names that do not exist, and calls
    of sparcom_jax callables whose arguments their signatures do not take."""

    def __init__(self):
        self.bound: dict[str, object] = {}  # local name -> sparcom_jax object
        self.problems: list[str] = []

    def _bind(self, local: str, dotted: str, line: int):
        try:
            self.bound[local] = _resolve(dotted)
        except (ImportError, AttributeError) as e:
            self.problems.append(f"line {line}: {dotted}: {e}")

    def visit_Import(self, node):
        for a in node.names:
            if a.name.split(".")[0] == "sparcom_jax":
                self._bind(a.asname or a.name.split(".")[0], a.name if a.asname else "sparcom_jax", node.lineno)

    def visit_ImportFrom(self, node):
        if (node.module or "").split(".")[0] == "sparcom_jax":
            for a in node.names:
                self._bind(a.asname or a.name, f"{node.module}.{a.name}", node.lineno)

    def _target(self, node):
        """The sparcom_jax object an expression names (sj.f, f, sj.sub.f), or None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._target(node.value)
            if inspect.ismodule(base):
                if not hasattr(base, node.attr):
                    self.problems.append(f"line {node.lineno}: {base.__name__} has no {node.attr!r}")
                    return None
                return getattr(base, node.attr)
        return None

    def visit_Attribute(self, node):
        self._target(node)
        self.generic_visit(node)

    def visit_Call(self, node):
        fn = self._target(node.func)
        starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        if callable(fn) and not starred:
            try:
                inspect.signature(fn).bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as e:
                self.problems.append(f"line {node.lineno}: {getattr(fn, '__name__', fn)}(...): {e}")
        for a in node.args:
            self.visit(a)
        for k in node.keywords:
            self.visit(k.value)
        if not isinstance(node.func, ast.Name):
            self.visit(node.func.value if isinstance(node.func, ast.Attribute) else node.func)


@pytest.mark.parametrize("page,line,code", PYTHON, ids=[f"{p}:{n}" for p, n, _ in PYTHON])
def test_python_blocks_name_the_real_api(page, line, code):
    check = _ApiCheck()
    check.visit(ast.parse(code, filename=f"{page}:{line}"))
    assert check.problems == [], f"{page}, block at line {line}"


def test_python_blocks_that_are_not_illustrations_run(tmp_path, monkeypatch):
    runnable = [(p, n, c) for p, n, c in PYTHON if not c.startswith(ILLUSTRATION)]
    assert runnable, "no runnable block left: the docs test would check nothing by running"
    monkeypatch.chdir(tmp_path)
    namespaces: dict[str, dict] = {}
    for page, line, code in runnable:
        exec(compile(code, f"{page}:{line}", "exec"), namespaces.setdefault(page, {}))


def test_json_record_examples_load(tmp_path):
    import sparcom_jax as sj

    examples = [c for _, _, c in blocks("json")]
    assert examples
    for i, code in enumerate(examples):
        path = tmp_path / f"example{i}.jsonl"
        path.write_text(code)
        records = sj.load_instructions(path)
        assert [r.id for r in records] == [json.loads(ln)["id"] for ln in code.splitlines() if ln.strip()]


def _command_lines() -> list[tuple[str, str]]:
    """(where, command line) of every `sparcom ...` line in unmarked and bash blocks."""
    out = []
    for page, line, code in blocks("") + blocks("bash"):
        joined = code.replace("\\\n", " ")
        for ln in joined.splitlines():
            ln = ln.strip().removeprefix("$ ")
            if ln.startswith("sparcom "):
                out.append((f"{page}:{line}", ln.split("#")[0].strip()))
    return out


COMMANDS = _command_lines()


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[c for _, c in COMMANDS])
def test_command_lines_parse_with_real_flags_and_keys(where, cmd):
    from sparcom_jax.cli import parse_args
    from sparcom_jax.config import DemoConfig, ExperimentConfig, load_config

    argv = shlex.split(cmd)[1:]
    args = parse_args(argv)  # an unknown command or flag exits (SystemExit)
    config = getattr(args, "config", None)
    if config and (ROOT / config).is_file():
        cls = DemoConfig if args.command == "demo" else ExperimentConfig
        load_config(ROOT / config, getattr(args, "overrides", None) or [], cls=cls)  # unknown keys raise
    else:
        assert not getattr(args, "overrides", None) or config is None, f"{where}: {config} is not in the repository"


def test_the_config_schema_states_the_defaults():
    from sparcom_jax.config import ExperimentConfig

    (schema,) = [c for p, _, c in blocks("yaml") if p == "cli.md"]
    documented = yaml.safe_load(schema)
    # Example values (no default exists, or the default is "the data section's").
    examples = {"name", "out_dir", "base.name", "base.path", "base.hub_id", "base.template"}
    code = ExperimentConfig(name="x")
    placeholders = []

    def walk(doc: dict, obj, prefix: str):
        fields = {f.name for f in dataclasses.fields(obj)}
        assert set(doc) == fields, f"{prefix or 'top level'}: documented {sorted(doc)} != code {sorted(fields)}"
        for key, value in doc.items():
            here, default = prefix + key, getattr(obj, key)
            if value == {"...": None}:  # "{...}": see elsewhere
                placeholders.append(here)
            elif isinstance(value, dict) and dataclasses.is_dataclass(default):
                walk(value, default, here + ".")
            elif here not in examples:
                default = list(default) if isinstance(default, tuple) else default
                assert value == default, f"{here}: documented {value!r}, code {default!r}"

    walk(documented, code, "")
    assert placeholders == ["finetuned", "architecture", "train"]


def test_the_trainconfig_table_states_the_defaults():
    from sparcom_jax.train import TrainConfig

    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("## Options (`TrainConfig`)"):]
    defaults = dataclasses.asdict(TrainConfig())
    seen = set()
    for row in re.findall(r"^\| (`.*?) \| (.*?) \|", table, re.M):
        names = re.findall(r"`(\w+)`", row[0])
        values = [v.strip().strip("`") for v in re.split(r" / |, ", row[1])]
        assert len(values) == len(names), row
        for name, value in zip(names, values):
            parsed = ast.literal_eval(value)
            assert parsed == defaults[name], f"TrainConfig.{name}: documented {value}, code {defaults[name]!r}"
            seen.add(name)
    assert seen == set(defaults), f"undocumented: {sorted(set(defaults) - seen)}"


def test_the_analyze_model_signature_states_the_defaults():
    # docs/analysis.md writes analyze_model's options with their defaults; most are analyze_field's
    # (passed through **field_kw), and nothing compared them: a changed default went unnoticed.
    from sparcom_jax.analysis import analyze_field, analyze_model

    text = (ROOT / "docs" / "analysis.md").read_text()
    (sig,) = re.findall(r"`(analyze_model\(counts.*?\))`", text, re.S)
    args = ast.parse(f"def {sig}: pass").body[0].args
    documented = {a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    model, field = (inspect.signature(f).parameters for f in (analyze_model, analyze_field))
    code = {k: (model[k] if k in model else field[k]).default for k in documented}
    assert documented == code
    options = {k for k, p in field.items() if p.kind is p.KEYWORD_ONLY}
    assert options == set(documented), f"undocumented: {sorted(options - set(documented))}"


# Backticked dotted names in the prose that start with a config section but are summary.json
# keys, Python or file names, not config keys (a prefix ending in "." covers a summary subtree).
NOT_CONFIG = ("ablation.neurons.", "ablation.experts.", "ablation.expert_neurons.", "ablation.ise",
              "ablation.ise_random", "ablation.isn", "ablation.random", "ablation.experts",
              "ablation.expert_neurons", "series.names", "series.json", "data.content_cut", "data.splits",
              "data.grouping", "data.jsonl", "report.excluded", "report.skipped", "report.export_sets")


def _config_key_exists(key: str) -> bool:
    """Whether `key` (a.b.c) is a field path of ExperimentConfig or DemoConfig (through the
    optional sections `finetuned` and `train_data` too)."""
    from sparcom_jax.config import DataSpec, DemoConfig, ExperimentConfig, ModelSpec

    optional = {"finetuned": ModelSpec, "train_data": DataSpec}
    for obj in (ExperimentConfig, DemoConfig):
        for part in key.split("."):
            f = {f.name: f for f in dataclasses.fields(obj)}.get(part) if dataclasses.is_dataclass(obj) else None
            if f is None:
                break
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            obj = type(default) if dataclasses.is_dataclass(default) else optional.get(part)
        else:
            return True
    return False


def _prose_config_keys() -> list[tuple[str, str]]:
    """(page:line, key) of every `section.key` (optionally `=value` or `: value`) in backticks
    whose first part is a config section."""
    from sparcom_jax.config import DemoConfig, ExperimentConfig

    sections = sorted({f.name for c in (ExperimentConfig, DemoConfig) for f in dataclasses.fields(c)})
    key = re.compile(r"`((?:%s)(?:\.\w+)+)(?:\s*[=:][^`]*)?`" % "|".join(sections))
    return [(f"{page.name}:{n}", k) for page in PAGES for n, ln in enumerate(page.read_text().splitlines(), 1)
            for k in key.findall(ln)]


def test_config_keys_named_in_the_prose_exist():
    found = _prose_config_keys()
    assert len(found) > 50, "the scan found too few keys: its pattern no longer matches the docs"
    bad = [f"{where}: {k}" for where, k in found
           if not _config_key_exists(k) and not any(k == n or n.endswith(".") and k.startswith(n)
                                                    for n in NOT_CONFIG)]
    assert bad == [], "config keys named in the docs that the config does not have (or add a summary key to " \
                      "NOT_CONFIG): " + "; ".join(bad)


def _defines(path: Path, name: str) -> bool:
    """Whether the module at `path` defines `name` at its top level (def, class or assignment)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def _named_files() -> list[tuple[str, str, str]]:
    """(page:line, path, name or "") of every backticked `path.py` (`path.py: Name`) and every
    repository path (tests/, scripts/, configs/, docs/) the prose names; a .py path not found
    from the repository root is read from sparcom_jax/ (architecture.md names modules so), a
    bare one from any of its packages."""
    ref = re.compile(r"`([\w/]+\.py)(?:: (\w+))?`|(?<![\w/.-])((?:tests|scripts|configs|docs)/[\w./-]*\w)")
    out = []
    for page in PAGES:
        for n, ln in enumerate(page.read_text().splitlines(), 1):
            for py, name, path in ref.findall(ln):
                out.append((f"{page.name}:{n}", py or path, name))
    return out


def test_files_and_names_the_prose_points_to_exist():
    found = _named_files()
    assert len(found) > 50, "the scan found too few paths: its pattern no longer matches the docs"
    bad = []
    for where, path, name in found:
        if path.startswith("scripts/bench_") and not path.endswith(".py"):  # "scripts/bench_*.py"
            continue
        # A bare module name (`params.py` in the models/ row) is looked for in every package.
        where_to = [ROOT / path, ROOT / "sparcom_jax" / path] + (
            [] if "/" in path else sorted((ROOT / "sparcom_jax").rglob(path)))
        file = next((p for p in where_to if p.exists()), None)
        if file is None:
            bad.append(f"{where}: {path} does not exist")
        elif name and not _defines(file, name):
            bad.append(f"{where}: {path} defines no {name}")
    assert bad == [], "; ".join(bad)


def test_error_types_the_prose_names_exist():
    import builtins

    import sparcom_jax

    defined = {m.group(1) for f in Path(sparcom_jax.__file__).parent.rglob("*.py")
               for m in re.finditer(r"^class (\w+(?:Error|Warning))\(", f.read_text(), re.M)}
    named = {(page.name, m) for page in PAGES for m in re.findall(r"`(\w+(?:Error|Warning))`", page.read_text())}
    assert len(named) > 5
    assert sorted(f"{p}: {e}" for p, e in named if e not in defined and not hasattr(builtins, e)) == []


def _package_callables() -> dict[str, list]:
    """{name: the sparcom_jax functions and classes of that name}, from every module."""
    import pkgutil

    import sparcom_jax

    out: dict[str, list] = {}
    for mod in pkgutil.walk_packages(sparcom_jax.__path__, "sparcom_jax."):
        for name, obj in vars(importlib.import_module(mod.name)).items():
            if callable(obj) and getattr(obj, "__module__", "").startswith("sparcom_jax") \
                    and not any(obj is o for o in out.get(name, [])):
                out.setdefault(name, []).append(obj)
    return out


def _params(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _takes(fn, keyword: str) -> bool:
    params = _params(fn)
    return not params or any(p.name == keyword and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD
                             for p in params)


def _inline_calls(fns: dict) -> list[tuple[str, str, dict]]:
    """(page, name, {keyword: ast node}) of every call of a sparcom_jax name written inline in
    the prose; a signature's `*` and "a"|"b" alternatives (the first kept) are read as a call."""
    call = re.compile(r"`(?:sj\.)?(?:\w+\.)*(\w+)\(([^`]*)\)`")
    out = []
    for page in PAGES:
        for m in call.finditer(page.read_text()):
            name, args = m.group(1), " ".join(m.group(2).split())
            args = re.sub(r'("\w+")(?:\|"\w+")+', r"\1", re.sub(r"(^|,)\s*\*\s*,", r"\1", args))
            if name not in fns:
                continue
            try:
                node = ast.parse(f"f({args})", mode="eval").body
            except SyntaxError:  # `path=None, ...`: the elided rest after a keyword
                node = ast.parse("f({})".format(re.sub(r",\s*\.\.\.\s*$", "", args)), mode="eval").body
            out.append((page.name, name, {k.arg: k.value for k in node.keywords if k.arg}))
    return out


# Calls the prose gives with other values than the defaults, as examples of a use.
EXAMPLE_CALLS = {("benchmarks.md", "init_model")}


def test_inline_calls_in_the_prose_use_real_keywords_and_defaults():
    """`ablation_matrix(sets, fn, *, n_random=19, ...)` in a sentence: every keyword is one that
    a sparcom_jax function or class of that name takes, and a literal value given is its
    default (values with `...` and the (page, name) pairs in EXAMPLE_CALLS excepted)."""
    fns = _package_callables()
    calls = _inline_calls(fns)
    assert sum(bool(k) for *_, k in calls) > 20, "the scan found too few calls: its pattern no longer matches"
    bad = []
    for page, name, keys in calls:
        for k, node in keys.items():
            if not any(_takes(f, k) for f in fns[name]):
                bad.append(f"{page}: {name}({k}=...) is not a keyword it takes")
                continue
            try:
                value = ast.literal_eval(node)
            except ValueError:
                continue
            defaults = [p.default for f in fns[name] for p in _params(f) if p.name == k and p.default is not p.empty]
            elided = any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(node))
            if not elided and (page, name) not in EXAMPLE_CALLS and defaults and value not in defaults:
                bad.append(f"{page}: {name}({k}={value!r}), the code's default is {defaults[0]!r}")
    assert bad == [], "; ".join(bad)


# Imports against architecture.md's floors that the page names as its exception.
FLOOR_EXCEPTIONS = {("models/transformer.py", "sparcom_jax.parallel.sharding")}


def test_each_floor_imports_only_from_the_floors_below():
    """architecture.md: 'Each floor imports only from the floors below it'; its floor table
    assigns every module and package of sparcom_jax to a floor."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    floors = {name.rstrip("/").removesuffix(".py"): int(m.group(1))
              for m in re.finditer(r"^\| (\d) \| (.*?) \|", text, re.M)
              for name in re.findall(r"`([\w./]+)`", m.group(2))}
    package = ROOT / "sparcom_jax"
    bad = []
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package).as_posix()
        if rel == "__init__.py":  # the package's front door re-exports every floor
            continue
        mine = floors.get(rel.split("/")[0].removesuffix(".py"))
        if mine is None:
            bad.append(f"{rel} is on no floor of architecture.md's table")
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                theirs = floors.get(parts[1]) if parts[0] == "sparcom_jax" and len(parts) > 1 else None
                if theirs is not None and theirs > mine and (rel, name) not in FLOOR_EXCEPTIONS:
                    bad.append(f"{rel} (floor {mine}) imports {name} (floor {theirs})")
    assert len(floors) > 15, "the floor table was not found in architecture.md"
    assert bad == [], "; ".join(bad)

"""Migration check: which peft names and keywords in a script deltatune does not support.

``check_source(text)`` parses a Python file or a notebook's code cells with ``ast`` (nothing is
run), finds what the code takes from ``peft`` (``from peft import X``, ``import peft as p``,
``p.X``), and for each use asks deltatune itself whether it would work after changing the import:

- a name: does ``deltatune`` export it (for ``from peft.sub import X``: ``deltatune.sub`` or the
  top level)?
- a call's keywords: does the deltatune callable accept them (``inspect.signature``)? A callable
  whose catch-all is named ``**_ignored`` accepts peft keywords it does not honour: a warning.
- a config's literal values: does the deltatune config accept them? (It is built with those
  values; its validation error is the finding.) Attributes of deltatune enums are checked too.
- methods on objects the code got from peft (``model = get_peft_model(...)``; ``model.x(...)``):
  does the deltatune class (by its return annotation) have them, with those keywords?

The answers come from introspection, so they stay true as deltatune grows; the only hand list is
``FORWARDED_BUT_WRONG``. ``deltatune doctor --peft-compat FILE`` prints them (see
``add_peft_compat_arguments`` / ``run_peft_compat``).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from deltatune.advisor.doctor import Finding, render

# Names a deltatune PeftModel answers only by forwarding to the base model, where they do something
# else than peft's: name -> what happens (flagged while deltatune's class does not define them).
FORWARDED_BUT_WRONG = {
    "push_to_hub": "deltatune's PeftModel forwards it to the base model, which would upload the full base weights",
}


@dataclass
class CompatFinding(Finding):
    """A ``doctor`` finding with where it is: ``line`` (1-based, within the cell) and ``cell``
    (a notebook's code-cell index, None for a plain file)."""

    line: int = 0
    cell: int | None = None


def check_source(text: str, filename: str | None = None) -> list[CompatFinding]:
    """Findings for the peft names, keywords and values ``text`` uses that deltatune does not support.

    ``text`` is Python source, or a notebook's JSON (``filename`` ending in ``.ipynb``, or text that
    parses as a notebook): its code cells are checked in order and names flow from cell to cell.
    IPython lines (``!pip ...``, ``%time``) are skipped. Unparsable code is one ``info`` finding.
    """
    return _run(text, filename).findings


def peft_imports(text: str, filename: str | None = None) -> list[tuple[int | None, int, str]]:
    """``(cell, line, peft name)`` for each name imported from peft that deltatune has (what was checked)."""
    return _run(text, filename).used


def _run(text: str, filename: str | None) -> "_Checker":
    cells = _cells(text, filename)
    checker = _Checker()
    for index, code in cells:
        checker.cell = index
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            checker.add("parse", "info", exc.lineno or 0, f"could not parse: {exc.msg}",
                        "peft uses in this cell are not checked", "fix the syntax and run the check again")
            continue
        checker.visit(tree)
    return checker


def _cells(text: str, filename: str | None) -> list[tuple[int | None, str]]:
    """``(cell index or None, code)`` pieces of a file or notebook."""
    notebook = (filename or "").endswith(".ipynb") or text.lstrip().startswith("{")
    if notebook:
        try:
            cells = json.loads(text).get("cells", [])
        except (json.JSONDecodeError, AttributeError):
            cells = None
        if cells is not None:
            code = [(i, c) for i, c in enumerate(cells) if c.get("cell_type") == "code"]
            return [(i, _strip_magics("".join(c.get("source", [])) if isinstance(c.get("source"), list)
                                      else c.get("source", ""))) for i, c in code]
    return [(None, text)]


def _strip_magics(code: str) -> str:
    """IPython shell and magic lines as blank lines (line numbers stay)."""
    return "\n".join("" if line.lstrip().startswith(("!", "%")) else line for line in code.splitlines())


class _Checker(ast.NodeVisitor):
    """Walks a module: records what names are bound to peft, checks each use against deltatune."""

    def __init__(self) -> None:
        self.findings: list[CompatFinding] = []
        self.cell: int | None = None
        self.bound: dict[str, tuple[str, object]] = {}      # local name -> (peft dotted name, deltatune object)
        self.modules: dict[str, str] = {}                   # local name -> peft module path
        self.instances: dict[str, tuple[str, type]] = {}    # variable -> (peft dotted name, deltatune class)
        self.seen: set[tuple] = set()
        self.used: list[tuple[int | None, int, str]] = []   # (cell, line, peft dotted name) resolved in deltatune

    def add(self, code: str, severity: str, line: int, message: str, why: str, fix: str) -> None:
        key = (code, self.cell, line, message)
        if key not in self.seen:
            self.seen.add(key)
            where = f"line {line}" if self.cell is None else f"cell {self.cell}, line {line}"
            self.findings.append(CompatFinding(code, severity, f"{where}: {message}", why, fix, line, self.cell))

    # -- imports -----------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "peft" or alias.name.startswith("peft."):
                local = alias.asname or alias.name.split(".")[0]
                self.modules[local] = alias.name if alias.asname else "peft"
                if alias.name != "peft" and _deltatune_module(alias.name) is None:
                    self.add("peft-module", "error", node.lineno, f"import {alias.name}: deltatune has no module "
                             f"{_to_deltatune(alias.name)}", "the import fails after the switch",
                             "import the names you need from deltatune's top level instead")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or not (module == "peft" or module.startswith("peft.")):
            return
        for alias in node.names:
            if alias.name == "*":
                self.add("peft-star", "info", node.lineno, f"from {module} import *: names are not checked",
                         "a star import hides which peft names the code uses", "import the names explicitly")
                continue
            dotted = f"{module}.{alias.name}"
            found, where = _resolve(module, alias.name)
            if found is _MISSING:
                self._missing(node.lineno, dotted)
                continue
            self.bound[alias.asname or alias.name] = (dotted, found)
            self.used.append((self.cell, node.lineno, dotted))
            if where != _to_deltatune(module):
                self.add("peft-import-path", "info", node.lineno, f"{dotted} is {where}.{alias.name} in deltatune",
                         f"deltatune has no module {_to_deltatune(module)}",
                         f"from {where} import {alias.name}")

    def _missing(self, line: int, dotted: str) -> None:
        leaf = dotted.rsplit(".", 1)[-1]
        elsewhere = _find_elsewhere(leaf)
        hint = f"deltatune has a different {leaf} in {elsewhere} (not peft's API)" if elsewhere else \
            "no equivalent in deltatune"
        self.add("peft-name", "error", line, f"{dotted} is not available in deltatune", hint,
                 "drop this use, or keep peft for this part of the code")

    # -- names in use -------------------------------------------------------------------------
    def _lookup(self, node: ast.AST) -> tuple[str, object] | None:
        """``(peft dotted name, deltatune object)`` for a Name/Attribute bound to peft, else None
        (a missing attribute of a peft module or name is reported here)."""
        if isinstance(node, ast.Name):
            if node.id in self.bound:
                return self.bound[node.id]
            return None
        if not isinstance(node, ast.Attribute):
            return None
        if isinstance(node.value, ast.Name) and node.value.id in self.modules:
            module = self.modules[node.value.id]
            found, _ = _resolve(module, node.attr)
            if found is _MISSING:
                self._missing(node.lineno, f"{module}.{node.attr}")
                return None
            return f"{module}.{node.attr}", found
        owner = self._lookup(node.value)
        if owner is None:
            return None
        dotted, obj = owner
        if inspect.isclass(obj) or inspect.ismodule(obj):
            if not hasattr(obj, node.attr):
                self.add("peft-attribute", "error", node.lineno, f"{dotted}.{node.attr} is not available in "
                         "deltatune", f"deltatune's {dotted.rsplit('.', 1)[-1]} has no {node.attr!r}",
                         "drop this use, or keep peft for this part of the code")
                return None
            return f"{dotted}.{node.attr}", getattr(obj, node.attr)
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        on_instance = isinstance(node.value, ast.Name) and node.value.id in self.instances
        if not on_instance:
            self._lookup(node)
        elif isinstance(node.ctx, ast.Load) and "__getattr__" not in vars(self.instances[node.value.id][1]):
            self._check_member(node.value.id, node.attr, node.lineno)  # a forwarding class: only calls are judged
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        kind = self._returns(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if kind is None:
                    self.instances.pop(target.id, None)
                else:
                    self.instances[target.id] = kind

    def _returns(self, node: ast.AST) -> tuple[str, type] | None:
        """What a call to a peft name returns, as ``(description, deltatune class)``, if known."""
        if not isinstance(node, ast.Call):
            return None
        found = self._lookup(node.func)
        if found is None:
            return None
        dotted, obj = found
        cls = obj if inspect.isclass(obj) else _return_class(obj)
        return (dotted, cls) if cls is not None else None

    def _check_member(self, variable: str, attr: str, line: int) -> None:
        dotted, cls = self.instances[variable]
        if hasattr(cls, attr) and attr not in FORWARDED_BUT_WRONG:
            return
        if attr in FORWARDED_BUT_WRONG and not hasattr(cls, attr):
            self.add("peft-method", "error", line, f"{variable}.{attr} (on the result of {dotted})",
                     FORWARDED_BUT_WRONG[attr], "save with save_pretrained and upload the directory yourself")
        elif "__getattr__" in vars(cls) and _base_model_has(attr):
            return  # forwarded to the wrapped transformers model, as peft does
        elif not hasattr(cls, attr):
            self.add("peft-method", "error", line, f"{variable}.{attr}: deltatune's {cls.__name__} has no {attr!r}",
                     f"{variable} comes from {dotted}", "drop this use, or keep peft for this part of the code")

    # -- calls --------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.instances:
            self._check_member(func.value.id, func.attr, node.lineno)
            _, cls = self.instances[func.value.id]
            member = inspect.getattr_static(cls, func.attr, None)
            if member is not None and callable(getattr(cls, func.attr)):
                is_method = not isinstance(member, (staticmethod, classmethod))
                self._check_keywords(node, f"{func.value.id}.{func.attr}", getattr(cls, func.attr),
                                     drop_first=is_method)
        else:
            found = self._lookup(func)
            if found is not None and callable(found[1]):
                self._check_keywords(node, found[0], found[1])
                self._check_values(node, found[0], found[1])
        self.generic_visit(node)

    def _check_keywords(self, node: ast.Call, name: str, obj, drop_first: bool = False) -> None:
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            return
        params = params[1:] if drop_first and params else params
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        catch_all = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        short = name.rsplit(".", 1)[-1]
        for kw in node.keywords:
            if kw.arg is None or kw.arg in named:
                continue
            if catch_all is None:
                self.add("peft-keyword", "error", kw.value.lineno, f"{short}({kw.arg}=...) is not supported by "
                         "deltatune", f"deltatune's {short} has no parameter {kw.arg!r}: a TypeError",
                         f"remove {kw.arg}=..." + _default_note(obj, kw))
            elif catch_all.startswith("_") or catch_all == "unhonoured":   # accepted; `unhonoured` also warns
                self.add("peft-ignored", "warning", kw.value.lineno, f"{short}({kw.arg}=...) is accepted and "
                         "ignored by deltatune", f"deltatune's {short} does not implement {kw.arg!r}",
                         f"check that the code does not rely on {kw.arg}")

    def _check_values(self, node: ast.Call, name: str, obj) -> None:
        """Build a deltatune config with the call's literal keyword values; its refusal is a finding."""
        if not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)):
            return
        fields = {f.name for f in dataclasses.fields(obj)}
        values, unknown = {}, []
        for kw in node.keywords:
            if kw.arg in fields:
                value = self._value(kw.value)
                if value is _MISSING:
                    unknown.append(kw.arg)
                else:
                    values[kw.arg] = (value, kw.value.lineno)
        try:
            obj(**{k: v for k, (v, _) in values.items()})
        except TypeError:
            return  # a required field given by a non-literal expression: nothing to judge
        except ValueError as exc:  # ConfigError is a ValueError
            def named(key):
                return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", str(exc)) is not None

            blamed = [k for k in values if named(k)] or ([] if unknown else list(values))
            if not blamed or any(named(k) for k in unknown):
                return  # the refusal involves a value this check cannot see
            short = name.rsplit(".", 1)[-1]
            line = values[blamed[0]][1] if blamed else node.lineno
            shown = ", ".join(f"{k}={values[k][0]!r}" for k in blamed)
            self.add("peft-value", "error", line, f"{short}({shown}) is refused by deltatune", str(exc),
                     "choose a value deltatune supports (the message says which), or keep peft for this config")

    def _value(self, node: ast.AST):
        """A keyword's value: a literal, an attribute of a peft-bound enum, or a peft-bound config
        built from literals (``loftq_config=LoftQConfig(loftq_bits=4)``); else ``_MISSING``."""
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        if isinstance(node, ast.Call) and not node.args:
            found = self._lookup(node.func)
            kwargs = {kw.arg: self._value(kw.value) for kw in node.keywords}
            if found is None or not inspect.isclass(found[1]) or None in kwargs or _MISSING in kwargs.values():
                return _MISSING
            try:
                return found[1](**kwargs)
            except Exception:  # noqa: BLE001 - the call itself is checked where it stands
                return _MISSING
        found = self._lookup(node) if isinstance(node, ast.Attribute) else None
        return found[1] if found is not None and not callable(found[1]) else _MISSING


_MISSING = object()


def _to_deltatune(module: str) -> str:
    return "deltatune" + module[len("peft"):]


def _deltatune_module(module: str):
    """The deltatune module for peft module path ``module`` (``peft.x`` -> ``deltatune.x``), or None."""
    try:
        return importlib.import_module(_to_deltatune(module))
    except ImportError:
        return None


def _resolve(module: str, name: str) -> tuple[object, str]:
    """``(deltatune object, module it was found in)`` for ``from <module> import <name>``: the same
    path in deltatune first, then deltatune's top level; ``(_MISSING, "")`` when neither has it."""
    for candidate in dict.fromkeys((_to_deltatune(module), "deltatune")):
        try:
            mod = importlib.import_module(candidate)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name), candidate
        try:
            return importlib.import_module(f"{candidate}.{name}"), candidate
        except ImportError:
            pass
    return _MISSING, ""


def _find_elsewhere(name: str) -> str | None:
    """A loaded deltatune module defining ``name`` (a hint, not a claim of compatibility)."""
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("deltatune.") and module is not None and name in vars(module):
            return module_name
    return None


def _return_class(fn) -> type | None:
    """The deltatune class ``fn`` is annotated to return, if any."""
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - an unresolvable annotation just means "unknown"
        return None
    return hint if inspect.isclass(hint) and hint.__module__.startswith("deltatune") else None


def _base_model_has(attr: str) -> bool:
    """True if a transformers model has ``attr`` (what a PeftModel forwards to)."""
    from transformers import GenerationMixin, PreTrainedModel

    return hasattr(PreTrainedModel, attr) or hasattr(GenerationMixin, attr)


def _default_note(obj, kw: ast.keyword) -> str:
    """`` (its value ... is peft's default: nothing changes)`` when a config's peft-only field is set to
    the value meaning "unused" (``peft_extra_defaults``)."""
    defaults = getattr(obj, "peft_extra_defaults", {}) or {}
    try:
        value = ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError):
        return ""
    if kw.arg in defaults and value == defaults[kw.arg]:
        return f" (its value {value!r} is peft's default, so nothing changes)"
    return ""


def check_file(path: str | Path) -> list[CompatFinding]:
    """``check_source`` on a file (``.py`` or ``.ipynb``)."""
    path = Path(path)
    return check_source(path.read_text(encoding="utf-8"), filename=path.name)


def add_peft_compat_arguments(parser) -> None:
    """Add ``--peft-compat FILE`` to the ``doctor`` parser (its positional path becomes optional)."""
    parser.add_argument("--peft-compat", metavar="FILE", nargs="+", default=None,
                        help="list the peft names, keywords and values a .py file or .ipynb notebook uses that "
                             "deltatune does not support (after changing `peft` to `deltatune` in the imports)")


def run_peft_compat(args) -> int:
    """Print the findings for each ``args.peft_compat`` file; exit code 1 when any is an error."""
    failed = False
    for path in args.peft_compat:
        findings = check_file(path)
        failed = failed or any(f.severity == "error" for f in findings)
        if getattr(args, "json", False):
            print(json.dumps({"file": str(path), "findings": [f.to_dict() for f in findings]}, indent=2))
        else:
            print(f"{path}:\n" + render(findings))
    return 1 if failed else 0

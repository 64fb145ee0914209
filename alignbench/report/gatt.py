"""Report section: Ghost Attention (Llama 2 §3.3), instruction adherence by turn with and without GAtt.

Reads the "gatt" rows of each run's results.csv (``alignbench.policy_measures.gatt_rows``: held-out instructions in
the first user turn of eval-split dialogues, the policy writing every assistant turn). A run is
"with GAtt" when its π0 is the ``pi0-gatt`` stage (metrics.json ``stages_reused``). Seeds of one
configuration are aggregated (``seed_interval``: Student-t below 5 seeds, bootstrap from 5; one seed:
the run's bootstrap over dialogues); configurations never are. The measured sentence compares, at
every turn after the first, each configuration with GAtt against each without ("higher" or
"lower" only when the two intervals do not overlap), and says for each whether adherence beyond
turn 2 is lower than at turn 1 (the forgetting GAtt is meant to fix).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.stats import seed_interval
from alignbench.report.load import Sweep
from alignbench.report.plots import save_figure
from alignbench.report.render import Heading, Note, Para, Table

EXPLAIN = (
    "Ghost Attention (Llama 2 §3.3): π0 is fine-tuned on dialogues whose assistant turns were sampled with a "
    "system instruction attached to every user turn, then trained with the instruction in the first turn only "
    "and the loss on the last assistant turn only (stage pi0-gatt, stages.pi0.gatt). Adherence at turn k: the "
    "share of eval-split dialogues (held-out instructions, never trained on, in the first user turn; the policy "
    "writes every assistant turn itself) whose k-th reply follows the instruction, checked on the text. "
    "Intervals: 95% over seeds (t below 5 seeds); with one seed, the run's bootstrap over dialogues.")


def adherence_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per (configuration, seed, turn): adherence and the run's interval over dialogues."""
    rows = []
    for run in sweep.ok_runs:
        if run.rows is None or run.rows.empty:
            continue
        g = run.rows[(run.rows["evaluator"] == "gatt") & (run.rows["metric"] == "adherence")]
        gatt = "pi0-gatt" in run.metrics.get("stages_reused", {})
        for r in g.itertuples():
            rows.append({"config": run.config, "seed": run.seed, "gatt": gatt, "turn": int(str(r.slice).split(":")[1]),
                         "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n})
    return pd.DataFrame(rows)


def by_config(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (configuration, turn): mean adherence over seeds and its interval (``seed_interval``;
    one seed: that run's interval over dialogues)."""
    out = []
    for (config, gatt, turn), g in frame.groupby(["config", "gatt", "turn"], sort=True):
        if len(g) == 1:
            mean, lo, hi, label = g.value.iloc[0], g.ci_low.iloc[0], g.ci_high.iloc[0], "bootstrap over dialogues"
        else:
            mean, lo, hi, label = seed_interval(g.value.to_numpy())
        out.append({"config": config, "gatt": gatt, "turn": turn, "mean": mean, "lo": lo, "hi": hi,
                    "interval": label, "seeds": len(g), "dialogues": int(g.n.iloc[0])})
    return pd.DataFrame(out)


def _cell(r) -> str:
    return f"{r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def adherence_table(agg: pd.DataFrame) -> Table:
    turns = sorted(agg.turn.unique())
    rows = []
    for (config, gatt), g in agg.groupby(["config", "gatt"], sort=True):
        cells = {r["turn"]: _cell(r) for _, r in g.iterrows()}
        rows.append([config, "yes" if gatt else "no", *[cells.get(t, "–") for t in turns],
                     str(g.seeds.max()), str(g.dialogues.max()), g.interval.iloc[0]])
    return Table(["configuration", "GAtt", *[f"turn {t}" for t in turns], "seeds", "dialogues", "interval"], rows)


def compare(with_gatt: dict, without: dict) -> str:
    """"higher", "lower" (with GAtt's interval entirely above / below the other's) or "overlap"."""
    if with_gatt["lo"] > without["hi"]:
        return "higher"
    if with_gatt["hi"] < without["lo"]:
        return "lower"
    return "overlap"


def claim_paragraphs(agg: pd.DataFrame) -> list:
    """Per pair (configuration with GAtt, without) and turn after the first: the measured comparison;
    then Llama 2's claim at the turns beyond 2 (the last turn when there are at most 2)."""
    on, off = agg[agg.gatt], agg[~agg.gatt]
    if on.empty or off.empty:
        return [Note("no configuration with GAtt and one without: no comparison to draw.")]
    words = {"higher": "higher with GAtt", "lower": "lower with GAtt", "overlap": "the intervals overlap: no difference shown"}
    paras = []
    for c_on in sorted(on.config.unique()):
        for c_off in sorted(off.config.unique()):
            a = {r["turn"]: r for _, r in on[on.config == c_on].iterrows()}
            b = {r["turn"]: r for _, r in off[off.config == c_off].iterrows()}
            turns = sorted(set(a) & set(b))
            late = [t for t in turns if t > 2] or turns[-1:]
            parts = [f"turn {t}: {_cell(a[t])} vs {_cell(b[t])}, {words[compare(a[t], b[t])]}"
                     for t in turns if t > 1]
            above = all(compare(a[t], b[t]) == "higher" for t in late)
            # "stays": no turn-1-to-late drop shown (the late interval reaches turn 1's)
            stays = {name: all(compare(d[t], d[turns[0]]) != "lower" for t in late) for name, d in (("on", a), ("off", b))}
            at = ", ".join(f"turn {t}" for t in late)
            if not above:
                verdict = f"not shown here: at {at} adherence with GAtt is not above the interval without it"
            elif stays["off"]:
                verdict = (f"only partly shown here: at {at} adherence with GAtt is above the interval without it, but "
                           "without GAtt adherence does not fall from turn 1, so the gap is not shown to be the "
                           "forgetting GAtt is meant to fix")
            elif not stays["on"]:
                verdict = (f"only partly shown here: at {at} adherence with GAtt is above the interval without it, "
                           "but it falls from turn 1 too")
            else:
                verdict = (f"supported here: at {at} adherence with GAtt is above the interval without it and "
                           "only without GAtt is it lower than at turn 1")
            drop = {True: "no drop from turn 1 is shown", False: "it is lower than at turn 1"}
            paras.append(Para(f"{c_on} (GAtt) against {c_off} (no GAtt), adherence by turn: " + "; ".join(parts)
                              + f". Llama 2's claim that adherence stays high beyond turn 2 only with GAtt is {verdict}. "
                              + f"From turn 1 to {at}: with GAtt {drop[stays['on']]}; without GAtt {drop[stays['off']]}."))
    return paras


def adherence_plot(agg: pd.DataFrame, path: Path) -> Path | None:
    """Adherence against turn per configuration, with its interval as error bars."""
    if agg.empty:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for (config, gatt), g in agg.groupby(["config", "gatt"], sort=True):
        g = g.sort_values("turn")
        ax.errorbar(g.turn, g["mean"], yerr=[g["mean"] - g.lo, g.hi - g["mean"]], marker="o", capsize=3,
                    label=f"{config} ({'GAtt' if gatt else 'no GAtt'})")
    ax.set(xlabel="turn", ylabel="instruction adherence", ylim=(-0.05, 1.05), xticks=sorted(agg.turn.unique()),
           title="Instruction adherence by turn (held-out instructions)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def gatt_blocks(sweep: Sweep, out_dir: Path, figure) -> list:
    """The section's blocks (none when no run has adherence rows); ``figure`` is build's ``_figure``."""
    frame = adherence_frame(sweep)
    if frame.empty:
        return []
    agg = by_config(frame)
    return [Heading("Ghost Attention"), Para(EXPLAIN), adherence_table(agg), *claim_paragraphs(agg),
            *figure(out_dir, "gatt_adherence.png", lambda p: adherence_plot(agg, p),
                    caption="Instruction adherence by turn, with and without GAtt", missing="no adherence rows")]

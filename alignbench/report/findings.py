"""The report's first section, Findings: one row per method family at a matched KL, the frontier
figure, and a few sentences generated from the numbers that say which pairs the measurements can
and cannot separate, and how far the judge itself is to be trusted.

Choice of each family's configuration (``alignbench.eval.frontier.common_kl_level`` and
``choose_at_common_kl``, on the frontier section's ``config_frame``): on the eval split only
(metrics.json ``selection``), never the test prompts; the numbers shown are the test prompts'.
The test judge reward and the paired differences between families come from
``alignbench.eval.frontier.ranking_rows`` (evaluator "findings" in results.csv); the gains and win
rates are the report's own rows (``gain_rows``, ``win_rates``, ``vs_chosen_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from alignbench.eval.frontier import (COMMON_BEST, COMMON_FIRST, COMMON_LOWEST, COMMON_ONLY, choose_at_common_kl,
                                      common_kl_level, ranking_rows, separates)
from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL
from alignbench.eval.stats import binomial_ci
from alignbench.report.frontier import FrontierData
from alignbench.report.load import Sweep
from alignbench.report.render import Note, Para, Table
from alignbench.report.tables import fmt, fmt_ci, fmt_flops, fmt_n, select

EVALUATOR = "findings"
HOW_TEXT = {COMMON_BEST: "eval split, best at KL ≤ level", COMMON_LOWEST: "eval split, none ≤ level: lowest KL",
            COMMON_ONLY: "only configuration", COMMON_FIRST: "no selection data: first by name"}


@dataclass
class Findings:
    level: float = float("nan")  # the common eval-split KL (not its square root)
    chosen: pd.DataFrame = field(default_factory=pd.DataFrame)  # config_frame's columns plus ``how``
    rows: list[dict] = field(default_factory=list)  # ranking_rows, evaluator "findings"


def findings_data(front: FrontierData, samples: pd.DataFrame, n_boot: int = 2000, seed: int = 0,
                  **ident) -> Findings:
    """The common eval-split KL level, each family's chosen configuration, and their test rows:
    ``ranking_rows`` with evaluator "findings" (its "matched_sqrt_kl" is sqrt of the level; slices
    "<config>|<how>"; per family "matched_gold_reward" over prompts, per pair "matched_gold_diff")."""
    if front.configs.empty:
        return Findings()
    level = common_kl_level(front.configs)
    chosen = choose_at_common_kl(front.configs, level)
    rows = []
    if "judge_reward" in samples and len(chosen):
        rows = ranking_rows(samples, chosen.assign(selected_on=chosen["how"]), float(np.sqrt(level)), n_boot=n_boot,
                            seed=seed, evaluator=EVALUATOR, **ident)
    return Findings(level=level, chosen=chosen, rows=rows)


def headline_frame(fnd: Findings, derived: pd.DataFrame, cost: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per family (test judge reward descending, unknown last): its chosen configuration,
    how it was chosen, eval-split judge reward and KL, and the test numbers: judge reward (bootstrap
    over prompts), judge gain, win rate vs ``baseline`` and vs the chosen response (value, lo, hi
    each), final KL, mean FLOPs and wall seconds over seeds."""
    cols = ["family", "config", "how", "selection", "selection_kl", "judge", "judge_lo", "judge_hi", "judge_n",
            "gain", "gain_lo", "gain_hi", "win", "win_lo", "win_hi", "chosen_win", "chosen_lo", "chosen_hi",
            "final_kl", "flops", "wall_s"]
    if fnd.chosen.empty:
        return pd.DataFrame(columns=cols)
    rows = pd.DataFrame(fnd.rows, columns=["config", "metric", "value", "ci_low", "ci_high", "n"])
    judge = rows[rows["metric"] == "matched_gold_reward"].set_index("config")
    gain = select(derived, "gain", "judge_gain")
    win = select(derived, "win_rate", "win_rate")
    vs = f"vs:{baseline}"
    lookups = {"gain": gain[gain["slice"] == vs].set_index("config"),
               "win": win[win["slice"] == vs].set_index("config"),
               "chosen": select(derived, "win_rate", "win_rate_vs_chosen").set_index("config")}

    def cell(frame: pd.DataFrame, key: str) -> list[float]:
        if key not in frame.index:
            return [np.nan] * 3
        r = frame.loc[key]
        r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
        return [float(r["value"]), float(r["ci_low"]), float(r["ci_high"])]

    out = []
    for c in fnd.chosen.itertuples():
        mine = cost[cost["config"] == c.config]
        out.append([c.family, c.config, c.how, c.selection, c.selection_kl, *cell(judge, c.family),
                    judge.loc[c.family, "n"] if c.family in judge.index else np.nan,
                    *cell(lookups["gain"], c.config), *cell(lookups["win"], c.config),
                    *cell(lookups["chosen"], c.config), c.final_kl, mine["flops"].mean(), mine["wall_s"].mean()])
    frame = pd.DataFrame(out, columns=cols)
    return frame.sort_values(["judge", "family"], ascending=[False, True], na_position="last").reset_index(drop=True)


def headline_table(head: pd.DataFrame, ref: str) -> Table:
    """The headline table of ``headline_frame``; ``ref``: the baseline's name in the headers."""
    rows = [[r.family, r.config, HOW_TEXT.get(r.how, r.how), fmt(r.selection), fmt(r.selection_kl, 4),
             f"{fmt_ci(r.judge, r.judge_lo, r.judge_hi)} (n = {fmt_n(r.judge_n)})",
             fmt_ci(r.gain, r.gain_lo, r.gain_hi), fmt_ci(r.win, r.win_lo, r.win_hi),
             fmt_ci(r.chosen_win, r.chosen_lo, r.chosen_hi), fmt(r.final_kl, 4), fmt_flops(r.flops), fmt(r.wall_s, 1)]
            for r in head.itertuples()]
    return Table(["family", "chosen configuration", "chosen by", "eval-split judge reward", "eval-split KL",
                  "test judge reward [95% CI, prompts]", f"judge gain vs {ref} [paired 95% CI]",
                  f"win rate vs {ref} [95% CI]", "win rate vs chosen response [95% CI]", "final KL (test prompts)",
                  "FLOPs (mean)", "wall s (mean)"], rows)


def rule_text(fnd: Findings, ref: str) -> str:
    """The selection rule, with this sweep's level; ``ref``: the baseline's label (``ref_label``)."""
    at = (f" (here {fmt(fnd.level, 4)})" if np.isfinite(fnd.level)
          else " (here none: no family has several configurations measured on the eval split)")
    return ("Each row is one method family. Its configuration is chosen on the eval split (metrics.json "
            "\"selection\", written when eval.selection_prompts > 0), never on the test prompts, at a matched KL: "
            "the common level is the smallest, over families with more than one configuration, of the family's "
            f"largest eval-split KL{at}; in each family the configuration with the highest eval-split judge "
            "reward among those whose eval-split KL is at or below that level is chosen, else the family's "
            "lowest-KL configuration; a family with one configuration takes it. Every other number is on the "
            f"test prompts: judge reward (seed means per prompt, bootstrap over prompts), judge gain and win rate "
            f"against {ref} (paired over prompts), win rate against the dataset's chosen response, the "
            "final KL, and FLOPs and wall seconds (means over seeds).")


def _signed(value: float, lo: float, hi: float) -> str:
    return f"{value:+.3f} [{lo:.3f}, {hi:.3f}]"


def _names(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def ref_label(baseline: str, is_pi0: bool) -> str:
    """How the report names the configuration gains and win rates are against: "π0 (<name>)" when it
    is the requested baseline (π0, context distilled), else just its name (build's fallback when π0
    has no usable samples)."""
    return f"π0 ({baseline})" if is_pi0 else baseline


def finding_sentences(head: pd.DataFrame, diffs: pd.DataFrame, baseline: str, judge: str,
                      ref: str = "π0") -> list[str]:
    """At most 6 sentences from the numbers (3 or more once a family stands beside π0). ``head``:
    ``headline_frame``; ``diffs``: the findings' "matched_gold_diff" rows (config = the family ahead,
    slice "vs:<family>", paired bootstrap over prompts); ``baseline``: π0's configuration, named
    ``ref`` in the text; ``judge``: ``judge_sentence``. In order: the highest and lowest test judge
    reward; the families whose gain over π0 separates from 0 (beats / falls below); those whose
    interval includes 0; the family pairs (π0's family left out) whose paired difference separates,
    then those whose does not (a pair without shared prompts: by whether their own intervals overlap,
    said so); the judge."""
    out = []
    known = head.dropna(subset=["judge"])
    if len(known):
        top, low = known.iloc[0], known.iloc[-1]
        out.append(f"Highest test judge reward: {top.family} ({top.config}) "
                   f"{fmt_ci(top.judge, top.judge_lo, top.judge_hi)}"
                   + (f"; lowest: {low.family} ({low.config}) {fmt_ci(low.judge, low.judge_lo, low.judge_hi)}."
                      if len(known) > 1 else "; it is the only family with judged samples."))
    others = head[(head["config"] != baseline) & head["gain"].notna()]
    apart = [(r.family, r) for r in others.itertuples() if separates(r.gain_lo, r.gain_hi)]
    if apart:
        out.append("; ".join(f"{f} {'beats' if r.gain > 0 else 'falls below'} {ref}: gain "
                             f"{_signed(r.gain, r.gain_lo, r.gain_hi)}" for f, r in apart) + ".")
    close = [r for r in others.itertuples() if not separates(r.gain_lo, r.gain_hi)]
    if close:
        out.append(f"{_names([r.family for r in close])} cannot be separated from {ref} (gain interval"
                   f"{'s include' if len(close) > 1 else ' includes'} 0: "
                   + "; ".join(f"{r.family} {_signed(r.gain, r.gain_lo, r.gain_hi)}" for r in close) + ").")
    if others.empty and len(head) > 1:
        out.append(f"No family has a judge gain over {ref}: it has no judged samples on prompts shared with it.")
    base_family = set(head.loc[head["config"] == baseline, "family"])
    pairs = diffs[~diffs["config"].isin(base_family) & ~diffs["slice"].str.removeprefix("vs:").isin(base_family)]
    split, tied = [], []
    for r in pairs.itertuples():
        a, b = r.config, r.slice.removeprefix("vs:")
        if pd.notna(r.value):
            (split if separates(r.ci_low, r.ci_high) else tied).append(
                (a, b, f"{_signed(r.value, r.ci_low, r.ci_high)}", f" (paired over {fmt_n(r.n)} prompts)"))
            continue
        # no judged prompt in common, so no paired difference: their own intervals, and the sentence says so
        ia, ib = (head[head["family"] == f].iloc[0] for f in (a, b))
        apart = ia.judge_lo > ib.judge_hi or ib.judge_lo > ia.judge_hi
        (split if apart else tied).append((a, b, None, f" (no shared prompts to pair: their intervals "
                                                      f"{fmt_ci(ia.judge, ia.judge_lo, ia.judge_hi)} and "
                                                      f"{fmt_ci(ib.judge, ib.judge_lo, ib.judge_hi)} "
                                                      f"{'do not overlap' if apart else 'overlap'})"))
    if split:
        out.append("; ".join(f"{a} beats {b}" + (f": difference {d}" if d else "") + why for a, b, d, why in split)
                   + ".")
    if tied:
        out.append("; ".join(f"{a} and {b} cannot be separated from each other"
                             + (f" (paired interval of their difference includes 0: {d})" if d else why)
                             for a, b, d, why in tied) + ".")
    return out + [judge]


def judge_sentence(sweep: Sweep, samples: pd.DataFrame, agg: pd.DataFrame) -> str:
    """What the judge is and how far it is known to be right: on hh_synth the gold reward (exact;
    with the proxy PM's agreement with gold), on real HH the test PM's held-out accuracy against the
    human labels (metrics.json ``judge_pm``, exact Clopper-Pearson interval) where the runs record it."""
    kinds = sorted({str(r.metrics["judge"]) for r in sweep.ok_runs
                    if isinstance(r.metrics, dict) and r.metrics.get("judge")})
    if not kinds and "judge" in samples:
        kinds = sorted(samples["judge"].dropna().astype(str).unique())
    if kinds == ["gold"]:
        gold = select(agg, PM_EVAL, "gold_accuracy")
        pm = "".join(f"; the proxy PM {r.config} that the methods optimise orders held-out pairs as gold does on "
                     f"{fmt_ci(r.value, r.ci_low, r.ci_high)} of {fmt_n(r.n)}" for r in gold.head(1).itertuples())
        return ("The judge is hh_synth's gold reward, the synthetic task's true reward: exact, so it has no held-out "
                f"error of its own{pm}.")
    if kinds == ["test_pm"]:
        records = [r.metrics.get("judge_pm") for r in sweep.ok_runs if isinstance(r.metrics, dict)]
        known = [r for r in records if isinstance(r, dict) and r.get("heldout_accuracy") is not None
                 and r.get("heldout_pairs")]
        if not known:
            return ("The judge is a test PM trained on comparisons no method sees; its held-out accuracy is not "
                    "recorded in these runs (metrics.json \"judge_pm\", runs from before it), so how often the judge "
                    "itself is wrong is not measured here.")
        acc, n = float(known[0]["heldout_accuracy"]), int(known[0]["heldout_pairs"])
        lo, hi = binomial_ci(acc * n, n)
        return (f"The judge is a test PM trained on comparisons no method sees; on held-out HH test pairs it agrees "
                f"with the human label on {fmt_ci(acc, lo, hi)} of {n} pairs: the judge behind every number above "
                f"itself disagrees with the humans on about {1 - acc:.0%} of held-out pairs.")
    name = ", ".join(kinds) if kinds else "not recorded"
    return f"The judge is {name}; its held-out accuracy is not known to the report."


def findings_blocks(fnd: Findings, head: pd.DataFrame, baseline: str, judge: str, figure: list,
                    is_pi0: bool = True) -> list:
    """The section's blocks after its heading: the rule, the headline table (or why there is none),
    the figure blocks ``figure`` (frontier.png), and the sentences. ``baseline``: the configuration
    gains and win rates are against; ``is_pi0``: whether it is π0 (``ref_label``)."""
    if head.empty:
        return [Note("no findings: no usable run."), *figure]
    notes = []
    if head["selection"].isna().all():
        notes.append(Note("No run records the eval-split selection measurement (eval.selection_prompts = 0), so "
                          "no configuration is chosen at a matched KL: each family shows its only configuration, or "
                          "its first by name, marked \"no selection data\"."))
    elif (head["how"] == COMMON_FIRST).any():
        notes.append(Note("Families marked \"no selection data\" lack the eval-split measurement in some run: they "
                          "show their first configuration by name, not one chosen at the matched KL."))
    diffs = pd.DataFrame(fnd.rows, columns=["config", "metric", "slice", "value", "ci_low", "ci_high", "n"])
    diffs = diffs[diffs["metric"] == "matched_gold_diff"]
    ref = ref_label(baseline, is_pi0)
    return [Para(rule_text(fnd, ref)), *notes, headline_table(head, ref), *figure,
            *(Para(s) for s in finding_sentences(head, diffs, baseline, judge, ref="π0" if is_pi0 else baseline))]

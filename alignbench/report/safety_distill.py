"""The report's "Targeted safety context distillation" section (Llama 2 §4.2.4; issue 14 §2).

Per π0 variant (``stages.pi0.safety_preprompt`` none | generic | template, each untargeted or
targeted: metrics.json ``pi0_safety``) of ``method=context_distilled`` runs: the gold harmless and
helpful parts, the violation and false-refusal rates on the evaluation prompts (the "safety" rows,
``alignbench.eval.safety``), seeds of one variant aggregated with their interval; then Llama 2
Fig. 16b's view from the ``pi0-safety`` stage records (the gold of the kept and undistilled
answers on the distillation prompts, against the null: a resample of π0's answer kept by the same
rule, binned by the undistilled answer's gold, or safety-PM score),
and a measured sentence on whether untargeted distillation hurt answers that were already good
and whether targeting avoided it. The section appears only when the sweep holds a distilled
variant and one other.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

from alignbench.eval.safety import SAFETY_METRICS
from alignbench.report.load import Sweep
from alignbench.report.render import Heading, Note, Para, Table
from alignbench.report.tables import fmt, fmt_ci, fmt_n

METHOD = "context_distilled"
VARIANT_COLUMNS = ["config", "variant", "preprompt", "targeted", "stage"]
HEADERS = {"gold_harmless": "gold harmless", "gold_helpful": "gold helpful", "violation_rate": "violation rate",
           "false_refusal_rate": "false-refusal rate"}
# the direction in which each metric is worse (for the findings)
WORSE_IF_HIGHER = {"gold_harmless": False, "gold_helpful": False, "violation_rate": True, "false_refusal_rate": True}

EXPLAIN = (
    "Safety context distillation (Llama 2 §4.2.4): π0 answers a seeded set of the methods' training prompts (by "
    "default adversarial ones only, the harmless subsets' harmful requests: stages.pi0.safety_prompt_pool) once "
    "reading a safety preprompt (never truncated: a long dialogue loses its first turns instead) and once without, and is fine-tuned on the prompt without the preprompt followed by the kept "
    "answer (loss on the answer only). Generic: one sentence saying the assistant avoids harm; template: plus an "
    "answer template per risk category (violence, theft, poisoning, break-in, cruelty). Untargeted keeps every "
    "distilled answer; targeted keeps one only where the safety PM scores it above π0's own answer, else π0's "
    "answer. Columns: on the evaluation prompts, the gold harmless part (harmful and edgy prompts), the gold "
    "helpful part (every prompt that is not harmful), the violation rate (harmful prompts answered with "
    "compliance) and the false-refusal rate (benign edgy prompts refused). Intervals: 95% over the seeds of a "
    "variant (t below 5 seeds), or one run's bootstrap over prompts; the seeds share the variant's π0 and differ "
    "in the evaluation samples.")

FIG16B = (
    "Llama 2 Fig. 16b's view, on the distillation prompts (the stage's own answers, one sample each, so no "
    "interval): the gold of the undistilled answer and of the kept one (the answer π0 is fine-tuned on: untargeted "
    "the distilled one; targeted the distilled one where the safety PM preferred it, else π0's own), in "
    "equal-count bins of the undistilled answer's gold (and, targeted, of its safety-PM score). Gold only measures "
    "here: it selects nothing. Binning on the undistilled answer's own score pushes the top bins' gain down and the "
    "bottom ones' up by regression to the mean alone, and a keep rule that picks the better of two answers lifts it "
    "whatever was distilled. The last column is the null that has both: a second independent sample of π0's answer "
    "kept by the same rule as the distilled one (untargeted, always; targeted, only where the safety PM scores it "
    "above π0's own answer, else π0's answer). The preprompt did something beyond regression and the keep rule "
    "only where the gain differs from the null's; it hurt already-good answers only where the gain lies below it.")


def variant_label(preprompt: str, targeted: bool) -> str:
    return preprompt if preprompt == "none" else f"{preprompt}, {'targeted' if targeted else 'untargeted'}"


def variant_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per configuration of ``method=context_distilled`` runs recording ``pi0_safety``."""
    recs = {}
    for run in sweep.ok_runs:
        ps = run.metrics.get("pi0_safety") if isinstance(run.metrics, dict) else None
        if run.method == METHOD and isinstance(ps, dict) and run.config not in recs:
            recs[run.config] = {"config": run.config, "variant": variant_label(ps["preprompt"], bool(ps["targeted"])),
                                "preprompt": ps["preprompt"], "targeted": bool(ps["targeted"]),
                                "stage": ps.get("stage")}
    order = {"none": 0, "generic": 1, "template": 2}
    frame = pd.DataFrame(list(recs.values()), columns=VARIANT_COLUMNS)
    return frame.assign(_o=frame["preprompt"].map(order).fillna(9)).sort_values(["_o", "targeted"]).drop(columns="_o")


def safety_frame(agg: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """The variants' aggregated "safety" rows (one per variant and metric)."""
    rows = agg[(agg["evaluator"] == "safety") & agg["metric"].isin(SAFETY_METRICS)]
    return variants[["config", "variant", "preprompt", "targeted"]].merge(rows, on="config")


def _kept(stage: Optional[dict]) -> str:
    if not stage:
        return "–"
    by_kind = stage.get("gold", {}).get("kept_by_kind", {})
    kinds = " (" + ", ".join(f"{k} {v['kept_distilled']}/{v['n']}" for k, v in by_kind.items()) + ")" if by_kind else ""
    return f"{stage['kept_distilled']}/{stage['prompts']}{kinds}"


def outcome_table(variants: pd.DataFrame, rows: pd.DataFrame) -> Table:
    body = []
    for v in variants.itertuples():
        mine = rows[rows["config"] == v.config].set_index("metric")
        cells = [fmt_ci(*mine.loc[m, ["value", "ci_low", "ci_high"]]) if m in mine.index else "–" for m in HEADERS]
        seeds = int(mine["n_seeds"].max()) if len(mine) else 0
        body.append([v.variant, *cells, fmt_n(seeds), _kept(v.stage), v.config])
    return Table(["π0 variant", *(f"{h} [95% CI]" for h in HEADERS.values()), "seeds",
                  "distilled answers kept (harmful, edgy, other)", "configuration"], body)


def bins_table(variants: pd.DataFrame) -> Optional[Table]:
    """Fig. 16b: per distilled variant and bin of the undistilled answer's score, the mean gold of
    the undistilled and distilled answers on the distillation prompts, and their difference."""
    body = []
    for v in variants.itertuples():
        gold = (v.stage or {}).get("gold") or {}
        for by, name in (("bins_by_gold", "gold"), ("bins_by_safety_pm", "safety PM")):
            for i, b in enumerate(gold.get(by, [])):
                null = f"{b['null_gain']:+.3f}" if b.get("null_gain") is not None else "–"
                body.append([v.variant, name, f"{i + 1}: [{fmt(b['lo'], 2)}, {fmt(b['hi'], 2)}]", fmt_n(b["n"]),
                             fmt(b["gold_undistilled"]), fmt(b["gold_distilled"]), f"{b['gain']:+.3f}", null])
    if not body:
        return None
    return Table(["π0 variant", "binned by (undistilled answer's)", "bin (score range)", "answers",
                  "gold undistilled", "gold kept (trained on)", "gain", "null: a resample kept by the same rule"], body)


def compare(a: pd.Series, b: pd.Series, metric: str) -> str:
    """"worse", "better" (a against b, its 95% interval clear of b's) or "unclear" (they overlap)."""
    if a["ci_low"] > b["ci_high"]:
        higher = True
    elif a["ci_high"] < b["ci_low"]:
        higher = False
    else:
        return "unclear"
    return "worse" if higher == WORSE_IF_HIGHER[metric] else "better"


def _change(rows: pd.DataFrame, a: str, b: str, metric: str) -> tuple[str, str]:
    """(verdict of config ``a`` against ``b`` on ``metric``, "x → y" from b to a)."""
    ra, rb = (rows[(rows["config"] == c) & (rows["metric"] == metric)] for c in (a, b))
    if ra.empty or rb.empty:
        return "missing", ""
    ra, rb = ra.iloc[0], rb.iloc[0]
    return compare(ra, rb, metric), f"{rb['value']:.3f} → {ra['value']:.3f}"


def _top_bin(stage: Optional[dict]) -> Optional[dict]:
    bins = ((stage or {}).get("gold") or {}).get("bins_by_gold") or []
    return bins[-1] if bins else None


def findings(variants: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """Per preprompt: did untargeted distillation hurt the already-good answers (the false-refusal
    rate and gold helpful part against π0 without it; Fig. 16b's top bin), did targeting avoid it?
    A change counts only when the two 95% intervals are apart; otherwise the sentence says so."""
    none = variants[variants["preprompt"] == "none"]
    if none.empty:
        return ["No π0 variant without safety distillation in this sweep: nothing to compare against."]
    base, out = none.iloc[0]["config"], []
    for preprompt in ("generic", "template"):
        arms = {bool(t): g.iloc[0] for t, g in variants[variants["preprompt"] == preprompt].groupby("targeted")}
        for targeted, v in sorted(arms.items()):
            parts = []
            for metric in ("violation_rate", "false_refusal_rate", "gold_helpful"):
                verdict, change = _change(rows, v["config"], base, metric)
                if verdict == "missing":
                    continue
                said = {"worse": "worse", "better": "better", "unclear": "no clear change (intervals overlap)"}[verdict]
                parts.append(f"{HEADERS[metric]} {change}: {said}")
            top = _top_bin(v["stage"])
            top_txt = ""
            if top:
                null = top.get("null_gain", float("nan"))
                rule = ("kept where the safety PM prefers it to π0's answer, as the targeted arm keeps the distilled "
                        "one" if targeted else "kept always, as the untargeted arm keeps the distilled one")
                top_txt = (f"; on the distillation prompts π0 already answered best (top quarter by gold) the kept "
                           f"answers changed gold by {top['gain']:+.3f}, against {null:+.3f} for the null, a second "
                           f"sample of π0's own answer {rule} (regression to the mean and the keep rule alone): "
                           f"{top['gain'] - null:+.3f} that the preprompt itself made")
            out.append(f"{v['variant']} against no distillation: " + "; ".join(parts) + top_txt + ".")
        if set(arms) == {False, True}:
            u, t = arms[False]["config"], arms[True]["config"]
            hurt = [m for m in ("false_refusal_rate", "gold_helpful") if _change(rows, u, base, m)[0] == "worse"]
            if hurt:
                fixed = [m for m in hurt if _change(rows, t, base, m)[0] != "worse"]
                out.append(f"{preprompt}: untargeted distillation hurt answers that were already good "
                           f"({', '.join(HEADERS[m] for m in hurt)} worse than without it), as Llama 2 found; "
                           + (f"targeting avoided it for {', '.join(HEADERS[m] for m in fixed)}." if fixed
                              else "targeting did not avoid it here."))
            else:
                out.append(f"{preprompt}: untargeted distillation did not measurably hurt already-good answers here "
                           "(false-refusal rate and gold helpful not worse with intervals apart), so this sweep "
                           "cannot show Llama 2's finding that targeting is needed to avoid it.")
    return out


def safety_distill_blocks(sweep: Sweep, agg: pd.DataFrame) -> list:
    """The section's blocks, or none unless the sweep holds a distilled π0 variant and one other."""
    variants = variant_frame(sweep)
    if len(variants) < 2 or not (variants["preprompt"] != "none").any():
        return []
    rows = safety_frame(agg, variants)
    head = [Heading("Targeted safety context distillation"), Para(EXPLAIN)]
    if rows.empty:
        return [*head, Note("no safety rows for these runs (they exist only on hh_synth, judged by the gold reward).")]
    bins = bins_table(variants)
    return [*head, outcome_table(variants, rows), *(Para(f) for f in findings(variants, rows)),
            Para(FIG16B),
            *([bins] if bins is not None else [Note("no stage records the gold bins (not hh_synth).")])]

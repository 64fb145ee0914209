"""The report's Findings section (issue 23 §3): each family's configuration chosen on the eval split at a
common KL, the fallback without selection data, the sentences' pairs and verdicts, and Findings as the
first section of report.md and index.html. Hand-computed numbers on a fake sweep written here."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from alignbench.eval import frontier
from alignbench.eval.stats import read_rows
from alignbench.run_evaluation import judge_record
from alignbench.report import findings
from alignbench.report.build import build_report

# --- the rule on a hand-made configuration frame -----------------------------------------------


def _configs():
    rows = [  # family, config, eval-split KL, eval-split judge reward, selected on the eval split
        ("ppo", "p1", 0.5, 0.3, True), ("ppo", "p2", 2.0, 0.9, True),
        ("dpo", "d1", 0.2, 0.4, True), ("dpo", "d2", 1.0, 0.6, True), ("dpo", "d3", 1.5, 0.95, True),
        ("best_of_n", "b1", 1.2, 0.5, True), ("best_of_n", "b2", 1.4, 0.45, True),
        ("rrhf", "r1", 1.5, 0.2, True), ("rrhf", "r2", 1.6, 0.7, True),
        ("context_distilled", "cd", 0.0, 0.0, True),
        # no selection data in some run: its KLs (max 0.3) must not set the level
        ("rs_finetune", "rs_b", 0.3, np.nan, False), ("rs_finetune", "rs_a", 0.2, np.nan, False),
    ]
    frame = pd.DataFrame(rows, columns=["family", "config", "selection_kl", "selection", "eval"])
    frame["select"] = frame["selection"]
    frame["selected_on"] = np.where(frame.pop("eval"), frontier.SELECTED_EVAL, frontier.SELECTED_TEST)
    return frame


def test_common_level_is_the_smallest_of_the_families_largest_eval_kl():
    # ppo 2.0, dpo 1.5, best_of_n 1.4, rrhf 1.6 -> 1.4; context_distilled has one configuration and
    # rs_finetune no selection data, so neither counts
    assert frontier.common_kl_level(_configs()) == 1.4


def test_choice_at_the_common_level_skips_a_better_configuration_past_it():
    chosen = frontier.choose_at_common_kl(_configs(), 1.4).set_index("family")
    assert chosen["config"].to_dict() == {"best_of_n": "b1", "context_distilled": "cd", "dpo": "d2", "ppo": "p1",
                                          "rrhf": "r1", "rs_finetune": "rs_a"}
    # p2 (0.9) and d3 (0.95) have the family's best eval reward but an eval KL past 1.4
    assert chosen.loc["ppo", "how"] == chosen.loc["dpo", "how"] == frontier.COMMON_BEST
    assert chosen.loc["rrhf", "how"] == frontier.COMMON_LOWEST  # 1.5 and 1.6 > 1.4: the lower KL, not r2's 0.7
    assert chosen.loc["context_distilled", "how"] == frontier.COMMON_ONLY
    assert chosen.loc["rs_finetune", "how"] == frontier.COMMON_FIRST  # rs_a: first by name
    # a configuration exactly at the level is within it; a NaN level leaves only the fallbacks
    assert frontier.choose_at_common_kl(_configs(), 1.5).set_index("family").loc["dpo", "config"] == "d3"
    none = frontier.choose_at_common_kl(_configs(), float("nan")).set_index("family")
    assert none.loc["ppo", "config"] == "p1" and none.loc["ppo", "how"] == frontier.COMMON_LOWEST
    assert np.isnan(frontier.common_kl_level(_configs().query("family == 'context_distilled'")))


# --- sentences on a hand-made headline frame ---------------------------------------------------

def _head(**gains):
    """A headline frame: family f's config is f_c; judge reward = its gain (π0 "cd" at 0)."""
    rows = [dict(family=f, config=f"{f}_c", judge=g[0], judge_lo=g[0] - 0.1, judge_hi=g[0] + 0.1, gain=g[0],
                 gain_lo=g[1], gain_hi=g[2]) for f, g in gains.items()]
    rows.append(dict(family="context_distilled", config="cd", judge=0.0, judge_lo=-0.1, judge_hi=0.1,
                     gain=np.nan, gain_lo=np.nan, gain_hi=np.nan))
    return pd.DataFrame(rows).sort_values("judge", ascending=False).reset_index(drop=True)


def test_sentences_name_what_separates_and_what_does_not():
    head = _head(best_of_n=(0.35, 0.08, 0.63), dpo=(0.30, -0.02, 0.61), ppo=(0.05, -0.2, 0.3),
                 rrhf=(-0.4, -0.6, -0.2))
    diffs = pd.DataFrame([dict(config="best_of_n", slice="vs:dpo", value=0.05, ci_low=-0.1, ci_high=0.2, n=40),
                          dict(config="best_of_n", slice="vs:rrhf", value=0.75, ci_low=0.5, ci_high=1.0, n=40),
                          dict(config="best_of_n", slice="vs:context_distilled", value=0.35, ci_low=0.1,
                               ci_high=0.6, n=40)])
    got = findings.finding_sentences(head, diffs, "cd", "JUDGE.")
    assert got == [
        "Highest test judge reward: best_of_n (best_of_n_c) 0.350 [0.250, 0.450]; lowest: rrhf (rrhf_c) "
        "-0.400 [-0.500, -0.300].",
        "best_of_n beats π0: gain +0.350 [0.080, 0.630]; rrhf falls below π0: gain -0.400 [-0.600, -0.200].",
        "dpo and ppo cannot be separated from π0 (gain intervals include 0: dpo +0.300 [-0.020, 0.610]; "
        "ppo +0.050 [-0.200, 0.300]).",
        "best_of_n beats rrhf: difference +0.750 [0.500, 1.000] (paired over 40 prompts).",  # π0's pair left out
        "best_of_n and dpo cannot be separated from each other (paired interval of their difference includes 0: "
        "+0.050 [-0.100, 0.200]).",
        "JUDGE."]
    assert 3 <= len(got) <= 6
    # a pair without shared prompts (NaN difference) falls back to its own intervals and says so
    unpaired = diffs.copy()
    unpaired.loc[unpaired["slice"] == "vs:dpo", ["value", "ci_low", "ci_high", "n"]] = [np.nan, np.nan, np.nan, 0]
    unpaired = pd.concat([unpaired, pd.DataFrame([dict(config="ppo", slice="vs:rrhf", value=np.nan, ci_low=np.nan,
                                                       ci_high=np.nan, n=0)])])
    got = findings.finding_sentences(head, unpaired, "cd", "J.")
    assert got[3] == ("best_of_n beats rrhf: difference +0.750 [0.500, 1.000] (paired over 40 prompts); ppo beats "
                      "rrhf (no shared prompts to pair: their intervals 0.050 [-0.050, 0.150] and -0.400 [-0.500, "
                      "-0.300] do not overlap).")
    assert got[4] == ("best_of_n and dpo cannot be separated from each other (no shared prompts to pair: their "
                      "intervals 0.350 [0.250, 0.450] and 0.300 [0.200, 0.400] overlap).")
    # against another baseline than π0 (build's fallback) the sentences name it
    named = findings.finding_sentences(head, diffs, "cd", "J.", ref="cd")
    assert named[1].startswith("best_of_n beats cd: gain +0.350")


# --- the report on a fake sweep ----------------------------------------------------------------

N = 40
RNG = np.random.default_rng(7)
SHARED = RNG.normal(0, 1, N)  # every configuration's per-prompt difficulty
OWN, OWN2 = RNG.normal(0, 0.3, N), RNG.normal(0, 0.3, N)
OWN -= OWN.mean()  # centred: dpo's gain is exactly 0.30, ppo's exactly 0.05
OWN2 -= OWN2.mean()
RRHF = "rrhf<b>"  # a family name from metrics.json: escaped wherever it is shown
# config: (method, family, eval-split KL or None, eval-split judge reward, test judge reward per prompt, final KL)
CONFIGS = {
    "context_distilled": ("context_distilled", "context_distilled", 0.0, 0.0, SHARED, 0.0),
    "rejection_sampling_n4": ("rejection_sampling", "best_of_n", 0.4, 0.5, SHARED + 0.35, 0.25),
    # the family's best eval reward (and test reward), but its eval KL 2.0 is past the level 1.0
    "rejection_sampling_n16": ("rejection_sampling", "best_of_n", 2.0, 0.9, SHARED + 1.0, 1.8),
    "dpo_b0.5": ("dpo", "dpo", 0.3, 0.2, SHARED - 0.2, 0.3),
    "dpo_b0.1": ("dpo", "dpo", 1.0, 0.6, SHARED + 0.30 + OWN, 0.9),  # exactly at the level: chosen
    "ppo_a": ("ppo", "ppo", 0.7, 0.3, SHARED + 0.05 + OWN2, 0.6),
    "rrhf_a": ("rrhf", RRHF, 1.5, 0.1, SHARED - 0.5, 1.4),  # both past the level: the lower KL
    "rrhf_b": ("rrhf", RRHF, 1.8, 0.8, SHARED + 2.0, 1.7),
}
LEVEL = 1.0  # min(best_of_n 2.0, dpo 1.0, rrhf 1.8); ppo and context_distilled have one configuration
CHOSEN_REWARD = SHARED + 0.2  # the dataset's chosen response
JUDGE_ACC, JUDGE_PAIRS = 0.65, 200


def _write_sweep(root, selection=True):
    entries = []
    for config, (method, family, kl, sel, judge, final_kl) in CONFIGS.items():
        run_id = f"{config}_s0"
        run = root / "runs" / run_id
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"status": "done"}))
        (run / "samples.jsonl").write_text("".join(json.dumps(dict(
            prompt_id=i, prompt=f"prompt {i}", response=f"{config} {i}", proxy_reward=0.0, judge_reward=float(j),
            judge="test_pm", chosen_judge_reward=float(c))) + "\n"
            for i, (j, c) in enumerate(zip(judge, CHOSEN_REWARD))))
        points = [dict(step=0, label="pi0", kl_k3=0.0, judge_reward=0.0, proxy_reward=0.0),
                  dict(step=-1, label="final", kl_k3=final_kl, judge_reward=float(judge.mean()), proxy_reward=0.0)]
        (run / "train_log.jsonl").write_text("".join(json.dumps(dict(p, method=method, seed=0)) + "\n" for p in points))
        metrics = {"method": method, "family": family, "seed": 0, "run_id": run_id, "config": config, "final": {},
                   "cost": {"wall_s": 10.0, "flops": 2e12}, "judge": "test_pm",
                   "judge_pm": {"key": "abc", "heldout_accuracy": JUDGE_ACC, "heldout_pairs": JUDGE_PAIRS}}
        if selection:
            metrics["selection"] = {"split": "eval", "n": 16, "judge_reward": sel, "kl": kl}
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "DONE").write_text("")
        entries.append(dict(run_id=run_id, method=method, seed=0, config=config, status="done", dir=f"runs/{run_id}"))
    (root / "index.json").write_text(json.dumps({"sweep": "findings-fake", "runs": entries}))
    return root


def _section(md: str) -> str:
    start = md.index("## Findings")
    return md[start:md.index("\n## ", start)]


def _row(md: str, family: str) -> list[str]:
    lines = [line for line in _section(md).splitlines() if line.startswith(f"| {family} |")]
    assert len(lines) == 1, (family, lines)
    return [c.strip() for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("findings")
    out = tmp / "out"
    build_report(_write_sweep(tmp / "sweep"), out, n_boot=400)
    return out


def test_headline_rows_are_chosen_at_the_common_level_and_show_test_numbers(built):
    md = (built / "report.md").read_text()
    assert f"largest eval-split KL (here {LEVEL:.4f})" in md
    bon = _row(md, "best_of_n")
    assert bon[:5] == ["best_of_n", "rejection_sampling_n4", "eval split, best at KL ≤ level", "0.500", "0.4000"]
    assert bon[5].startswith(f"{0.35 + SHARED.mean():.3f} \\[") and bon[5].endswith("(n = 40)")
    # gain +0.35 on every prompt; it beats π0 and the chosen response (π0 + 0.2) on every prompt
    assert bon[6:] == ["0.350 \\[0.350, 0.350\\]", "1.000 \\[1.000, 1.000\\]", "1.000 \\[1.000, 1.000\\]", "0.2500",
                       "2e+12", "10.0"]
    dpo = _row(md, "dpo")
    assert dpo[1:5] == ["dpo_b0.1", "eval split, best at KL ≤ level", "0.600", "1.0000"]
    assert dpo[6].startswith("0.300 \\[")
    rrhf = _row(md, "rrhf&lt;b&gt;")  # escaped; rrhf_b (eval reward 0.8, test +2.0) is past the level
    assert rrhf[1:5] == ["rrhf_a", "eval split, none ≤ level: lowest KL", "0.100", "1.5000"]
    assert rrhf[6:9] == ["-0.500 \\[-0.500, -0.500\\]", "0.000 \\[0.000, 0.000\\]", "0.000 \\[0.000, 0.000\\]"]
    assert _row(md, "ppo")[1:3] == ["ppo_a", "only configuration"]
    assert _row(md, "context_distilled")[6:8] == ["–", "–"]  # π0 against itself
    order = [line.split("|")[1].strip() for line in _section(md).splitlines() if line.startswith("| ")][1:]
    assert order == ["best_of_n", "dpo", "ppo", "context_distilled", "rrhf&lt;b&gt;"]  # test judge reward, descending

    res = read_rows(built / "results.csv")
    rows = res[res["evaluator"] == "findings"]
    assert rows.loc[rows["metric"] == "matched_sqrt_kl", "value"].iloc[0] == pytest.approx(np.sqrt(LEVEL))
    gold = rows[rows["metric"] == "matched_gold_reward"].set_index("config")
    assert gold.loc["best_of_n", "slice"] == f"rejection_sampling_n4|{frontier.COMMON_BEST}"
    assert gold.loc["best_of_n", "value"] == pytest.approx(0.35 + SHARED.mean())
    diff = rows[rows["metric"] == "matched_gold_diff"].set_index(["config", "slice"])
    assert diff.loc[("best_of_n", "vs:dpo"), "value"] == pytest.approx(0.05)
    assert diff.loc[("best_of_n", "vs:dpo"), "ci_low"] < 0 < diff.loc[("best_of_n", "vs:dpo"), "ci_high"]


def test_sentences_on_the_fake_sweep(built):
    md = (built / "report.md").read_text()
    paras = [p for p in _section(md).split("\n\n") if p and not p.startswith(("|", "#", "!", "<", ">"))][1:]
    assert 3 <= len(paras) <= 6
    top = 0.35 + SHARED.mean()
    assert paras[0].startswith(f"Highest test judge reward: best_of_n (rejection_sampling_n4) {top:.3f} \\[")
    assert paras[1].startswith("best_of_n beats π0: gain +0.350 \\[0.350, 0.350\\]; dpo beats π0: gain +0.300 \\[")
    assert paras[1].endswith("rrhf&lt;b&gt; falls below π0: gain -0.500 \\[-0.500, -0.500\\].")
    assert paras[2].startswith("ppo cannot be separated from π0 (gain interval includes 0: ppo +0.050 \\[")
    # pairs without π0's family, in order of test reward: only best_of_n vs dpo (+0.05 ± noise) is unseparated
    assert paras[3].startswith("best_of_n beats ppo: difference +0.300 \\[")
    assert paras[3].count(" beats ") == 5
    assert paras[4] == ("best_of_n and dpo cannot be separated from each other (paired interval of their difference "
                        "includes 0: +0.050 " + _interval(built, "best_of_n", "dpo") + ").")
    lo, hi = sps.binomtest(int(JUDGE_ACC * JUDGE_PAIRS), JUDGE_PAIRS).proportion_ci(method="exact")
    assert paras[5] == (f"The judge is a test PM trained on comparisons no method sees; on held-out HH test pairs it "
                        f"agrees with the human label on 0.650 \\[{lo:.3f}, {hi:.3f}\\] of 200 pairs: the judge behind "
                        "every number above itself disagrees with the humans on about 35% of held-out pairs.")


def _interval(out, a, b) -> str:
    res = read_rows(out / "results.csv")
    r = res[(res["evaluator"] == "findings") & (res["config"] == a) & (res["slice"] == f"vs:{b}")].iloc[0]
    return f"\\[{r['ci_low']:.3f}, {r['ci_high']:.3f}\\]"


def test_findings_is_the_first_section_in_both_files(built):
    md = (built / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[:3] == ["Findings", "Runs", "Configurations"]
    assert re.search(r"\*\*Contents\*\*\n\n- \[Findings\]\(#findings\)\n- \[Runs\]\(#runs\)", md)
    assert "](frontier.png)" in _section(md) and md.count("](frontier.png)") == 1  # shown once, in Findings
    page = (built / "index.html").read_text()
    assert re.findall(r"<h2 id=\"([^\"]+)\">", page)[:3] == ["findings", "runs", "configurations"]
    assert page.index('<nav id="contents">') < page.index('<h2 id="findings">') < page.index('<h2 id="runs">')
    assert re.search(r'<nav id="contents"><b>Contents</b><ul><li class="toc2"><a href="#findings">', page)
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and "findings" in ids
    assert "rrhf&lt;b&gt;" in page and "<b>x" not in page and "rrhf<b>" not in page and "rrhf<b>" not in md
    # every table sits in its own sideways-scrolling box
    assert page.count("<table>") == page.count('<div class="wide"><table>') > 0


def test_without_selection_data_the_report_says_so_and_takes_the_first_configuration(tmp_path):
    md = build_report(_write_sweep(tmp_path / "sweep", selection=False), tmp_path / "out", n_boot=100).read_text()
    section = _section(md)
    assert "No run records the eval-split selection measurement (eval.selection_prompts = 0)" in section
    assert "(here none: no family has several configurations measured on the eval split)" in section
    # first by name: "rejection_sampling_n16" sorts before "rejection_sampling_n4"
    assert _row(md, "best_of_n")[1:5] == ["rejection_sampling_n16", "no selection data: first by name", "–", "–"]
    assert _row(md, "dpo")[1:3] == ["dpo_b0.1", "no selection data: first by name"]
    assert _row(md, "ppo")[1:3] == ["ppo_a", "only configuration"]


def test_judge_sentence_on_gold_and_on_runs_without_the_record():
    sweep = SimpleNamespace(ok_runs=[SimpleNamespace(metrics={"judge": "test_pm"})])
    text = findings.judge_sentence(sweep, pd.DataFrame(), pd.DataFrame(columns=["evaluator", "metric"]))
    assert "its held-out accuracy is not recorded in these runs" in text
    gold = pd.DataFrame([dict(evaluator="pm_accuracy", metric="gold_accuracy", config="pm", value=0.7, ci_low=0.6,
                              ci_high=0.8, n=100)])
    text = findings.judge_sentence(SimpleNamespace(ok_runs=[]), pd.DataFrame(dict(judge=["gold"])), gold)
    assert text == ("The judge is hh_synth's gold reward, the synthetic task's true reward: exact, so it has no "
                    "held-out error of its own; the proxy PM pm that the methods optimise orders held-out pairs as "
                    "gold does on 0.700 [0.600, 0.800] of 100.")


def test_runs_record_the_test_pm_judge_accuracy_from_its_stage_record():
    pm = SimpleNamespace(key="k1", record={"metrics": {"heldout_accuracy": 0.61}, "data_counts": {"heldout_pairs": 50}})
    ctx = SimpleNamespace(judge_name="test_pm", stages=SimpleNamespace(judge_pm=pm))
    assert judge_record(ctx) == {"key": "k1", "heldout_accuracy": 0.61, "heldout_pairs": 50}
    assert judge_record(SimpleNamespace(judge_name="gold", stages=SimpleNamespace(judge_pm=None))) is None


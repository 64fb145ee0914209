"""``build_report(sweep_dir, out_dir)``: read a sweep, compute the cross-run results, and write
``results.csv``, the PNG figures, ``report.md`` and a self-contained ``index.html``.

Runs that are missing, incomplete, failed or unreadable are listed with their mark and left out
of every number; the report builds as long as ``index.json`` exists. The unit of every table,
figure, win rate and Elo is the configuration (method plus its own overrides): seeds of one
configuration are aggregated, configurations never are.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from alignbench.eval.kl_reward import kl_reward_rows, points_frame
from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL
from alignbench.eval.stats import COLUMNS, MIN_SEEDS_BOOTSTRAP, write_rows
from alignbench.eval.win_rate import elo_rows, gain_rows, win_rates
from alignbench.report import (atomic, chains, findings, frontier, gatt, iterated, plots, pm_objectives, safety, tables, views,
                               walltime)
from alignbench.report.safety_distill import safety_distill_blocks
from alignbench.report.aggregate import (aggregate_seeds, baseline_config, combine_rows, cost_frame, judge_scores,
                                         nlp_deltas, prompt_meta, response_texts, samples_frame, subset_rows,
                                         train_points)
from alignbench.report.load import Sweep, load_sweep
from alignbench.report.render import Heading, Image, Links, Note, Para, Samples, to_html, to_markdown

BASELINE = "context_distilled"
N_SAMPLE_PROMPTS = 3
MAX_SAMPLE_CHARS = 2000

INTERVALS = [
    "All intervals are 95%.",
    "PM accuracy, calibration bins and the decisive win rate: exact Clopper-Pearson binomial intervals; "
    "a tie (equal PM scores) counts as half right.",
    "Win rate (primary): (wins + ties/2) / prompts, with a seeded percentile bootstrap over prompts. Two "
    "identical responses tie whatever their judge scores (a score can differ in the last bits with batch "
    "padding). With several seeds, a configuration's judge reward on a prompt is the mean over its usable "
    "seeds, and its response counts as one text only when every seed gave it.",
    "Elo: Bradley-Terry maximum likelihood on the win/tie counts (400/ln 10 per logit, baseline at 0), "
    "with a percentile bootstrap over prompts.",
    "Across seeds (only seeds of one configuration are ever combined): the mean of the runs' values; with "
    f"{MIN_SEEDS_BOOTSTRAP} or more seeds a percentile bootstrap over the seed values (\"bootstrap(n=N)\"), "
    f"with 2-{MIN_SEEDS_BOOTSTRAP - 1} seeds a Student-t interval mean ± t(0.975, N−1)·s/√N (\"t(n=N)\": "
    "t-interval over N seeds; wide on purpose, a few seeds say little), shown with the range (min–max) of the "
    "seeds; a metric from one run keeps that run's own interval (\"run\").",
    "Mean judge reward of a run or of a subset of prompts: percentile bootstrap over prompts.",
    "Gain over the baseline (proxy or judge reward): mean per-prompt difference on the same prompts, "
    "paired percentile bootstrap over prompts.",
    "NLP deltas: normal approximation from both sides' intervals, treated as independent (conservative).",
]

BON_KL = (
    "Best-of-n KL: log n − (n−1)/n is an upper bound on KL(best-of-n ‖ π0) (Beirami et al. 2024, "
    "arXiv 2401.01879), reached only by a continuous reward; repeated responses (ties) lower the true KL. "
    "The measured KL is the exact best-of-n KL of the empirical reward distribution of a pool of m "
    "independent π0 samples per prompt (identical responses are one candidate with one score), averaged "
    "over prompts. It never exceeds the bound and is biased low; bias measured against exact enumeration "
    "(n = 16): −0.003 (m = 64) and −0.0002 (m = 256) for a continuous reward, −0.035 (m = 64) and −0.009 "
    "(m = 256) for a 3-level reward with probabilities 0.7/0.2/0.1.")


def _derived_rows(sweep: Sweep, scores: dict, proxy: dict, baseline: str, n_boot: int, seed: int,
                  texts: dict, prompt_ids: list[int], meta: pd.DataFrame) -> pd.DataFrame:
    """Cross-run rows, keyed by configuration (``config``; ``method`` its method): reward-vs-KL fits,
    win rates, Elo, gains, and judge reward and win rate per subset of the evaluation prompts."""
    ident = dict(sweep=sweep.name, run="")
    texts = texts or None
    rows = kl_reward_rows(train_points(sweep), n_boot=n_boot, boot_seed=seed, **ident)
    by_config = []  # rows whose ``method`` is a configuration's name (the keys of ``scores``)
    if len(scores) >= 2:
        by_config += win_rates(scores, baseline, n_boot=n_boot, seed=seed, texts=texts, **ident)
        by_config += elo_rows(scores, baseline, seed=seed, texts=texts, **ident)
        by_config += gain_rows(scores, baseline, "judge_gain", n_boot=n_boot, seed=seed, **ident)
    if len(proxy) >= 2 and baseline in proxy:
        by_config += gain_rows(proxy, baseline, "proxy_gain", n_boot=n_boot, seed=seed, **ident)
    by_config += subset_rows(scores, texts or {}, prompt_ids, meta=meta, baseline=baseline, n_boot=n_boot, seed=seed,
                             **ident)
    return pd.DataFrame(rows + _as_config_rows(sweep, by_config), columns=list(COLUMNS))


def _view_rows(sweep: Sweep, samples: pd.DataFrame, scores: dict, prompt_ids: list[int], baseline: str, n_boot: int,
               seed: int) -> list[dict]:
    """Win rates against the dataset's chosen response, overall and per sampling temperature."""
    ident = dict(sweep=sweep.name, run="")
    chosen = views.chosen_scores(samples, prompt_ids)
    rows = views.vs_chosen_rows(scores, chosen, n_boot=n_boot, seed=seed, **ident) if chosen is not None else []
    return rows + views.temperature_rows(views.temperature_frame(sweep), baseline, n_boot=n_boot, seed=seed, **ident)


def _as_config_rows(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Rows computed per configuration name (in ``method``): ``config`` gets that name and ``method``
    the configuration's method."""
    methods = {r.config: r.method for r in sweep.runs}
    return [{**r, "config": r["method"], "method": methods.get(r["method"], r["method"])} for r in rows]


def _figure(out_dir: Path, name: str, draw, caption: str, missing: str) -> list:
    """Draw one figure into out_dir/name; a note instead when ``draw`` has nothing to plot."""
    path = out_dir / name
    path.unlink(missing_ok=True)  # never leave a stale figure from an earlier build
    return [Image(path, caption)] if draw(path) is not None else [Note(f"{caption}: skipped, {missing}.")]


def companion_blocks(out_dir: Path) -> list:
    """Links to the reports in sub-folders of ``out_dir`` (a study built from several sweeps, e.g.
    reports/iterated-synth/pm-objectives/): build those first, then this one."""
    subs = sorted(d.name for d in out_dir.iterdir() if d.is_dir() and (d / "report.md").exists())
    if not subs:
        return []
    return [Heading("Companion reports"),
            Para("Reports of this study's other sweeps, in sub-folders of this one (their numbers are theirs):"),
            Links([(f"{name}: report.md", f"{name}/report.md") for name in subs]),
            Links([(f"{name}: index.html", f"{name}/index.html") for name in subs])]


def _table(table, missing: str) -> list:
    return [table] if table is not None else [Note(f"no table: {missing}.")]


def _bon_block(table) -> list:
    return [table, Para(BON_KL)] if table is not None else [Note("no table: no best-of-n points (label n=<N>).")]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS] + " […]"


def _sample_block(samples: pd.DataFrame, prompt_ids: list[int], methods: list[str]) -> list:
    """``methods``: the configurations to show, side by side."""
    if not prompt_ids:
        return [Note("no prompt has a judged sample from every configuration with usable runs.")]
    first = samples.sort_values("seed").drop_duplicates(["config", "prompt_id"]).set_index(["config", "prompt_id"])
    items = [{"prompt_id": pid,
              "prompt": _clip(str(first.loc[(methods[0], pid), "prompt"])),
              "responses": {m: _clip(f"[judge {first.loc[(m, pid), 'judge_reward']:.3f}] "
                                     f"{first.loc[(m, pid), 'response']}") for m in methods}}
             for pid in sorted(prompt_ids)[:N_SAMPLE_PROMPTS]]
    return [Para("Responses of each configuration's lowest usable seed to the same prompts (judge reward in "
                 "brackets)."),
            Samples(methods, items)]


def _view_blocks(out_dir: Path, derived: pd.DataFrame, agg: pd.DataFrame, samples: pd.DataFrame, points: list[dict],
                 baseline: str) -> list:
    """Temperature and diversity, reward distributions and PM robustness (alignbench.report.views)."""
    no_temps = "no run has samples_by_temperature.jsonl (eval.temperatures empty, or runs from before it)"
    div = views.diversity_frame(agg)
    rob = views.robustness_frame(points)
    no_rob = "no train_log point records proxy_judge_agreement or proxy_judge_spearman (runs from before them)"
    return [Heading("Temperature and diversity"),
            Para("Win rates use sample 0 of each prompt, seeds averaged per prompt, bootstrap over prompts. "
                 "Diversity: distinct-n = distinct n-grams / n-grams over all samples at that T (k per prompt, "
                 "sacrebleu 13a tokens); self-BLEU = BLEU "
                 "of each sample against the prompt's other samples (higher: samples more alike, less diverse); "
                 "intervals over seeds."),
            *_table(views.temperature_table(derived, agg, baseline), no_temps),
            *_figure(out_dir, "temperature.png", lambda p: views.temperature_plot(derived, baseline, p),
                     "Win rate against the baseline and against the chosen response per temperature", no_temps),
            *_table(views.diversity_table(div), "no diversity rows (eval.temperatures empty, or runs from before it)"),
            *(Para(f) for f in views.diversity_findings(div, baseline)),
            *_figure(out_dir, "diversity.png", lambda p: views.diversity_plot(div, p),
                     "Distinct-1, distinct-2 and self-BLEU against temperature", "no diversity rows"),
            Heading("Reward distributions"),
            *_table(views.reward_table(views.reward_summary(samples)), "no judged samples"),
            *_figure(out_dir, "reward_hist.png", lambda p: views.reward_hist_plot(samples, p),
                     "Judge and proxy reward of the final samples per configuration (seeds pooled)",
                     "no judged samples"),
            Heading("PM robustness"),
            Para("Agreement: share of eval prompts (judge not tied) where proxy and judge prefer the same of this "
                 "point's sample and π0's; Spearman ρ: rank correlation of proxy and judge reward over the point's "
                 "samples. Seed means per log point."),
            *_table(views.robustness_table(rob), no_rob),
            *_figure(out_dir, "pm_robustness.png", lambda p: views.robustness_plot(rob, p),
                     "Proxy–judge agreement and rank correlation against sqrt(KL)", no_rob)]


def build_report(sweep_dir, out_dir, baseline: str = BASELINE, n_boot: int = 2000, seed: int = 0,
                 command: str = "") -> Path:
    """Build the report of ``sweep_dir`` into ``out_dir``; returns the path of ``report.md``.
    ``command``: the report command, printed at the top after the sweep's own (index.json). The
    directory is replaced whole (``atomic.replacing``): a build that fails or is killed leaves the
    previous report as it was."""
    sweep = load_sweep(sweep_dir)  # a bad sweep fails before anything is touched
    with atomic.replacing(Path(out_dir)) as new_dir:
        _build(sweep, new_dir, baseline=baseline, n_boot=n_boot, seed=seed, command=command,
               companions=companion_blocks(Path(out_dir)) if Path(out_dir).is_dir() else [])
    return Path(out_dir) / "report.md"


def _build(sweep: Sweep, out_dir: Path, *, baseline: str, n_boot: int, seed: int, command: str,
           companions: list) -> None:
    notes = list(sweep.notes)

    rows = combine_rows(sweep)
    agg = aggregate_seeds(rows, n_boot=n_boot, seed=seed)
    samples = samples_frame(sweep)
    scores, prompt_ids = judge_scores(samples)
    methods = {r.config: r.method for r in sweep.runs}
    base = baseline_config({*scores, *agg["config"]}, methods, baseline) or baseline
    win_base = base
    if scores and base not in scores:
        win_base = sorted(scores)[0]
        notes.append(f"baseline {baseline!r} has no usable samples; win rates and Elo are against {win_base!r}.")
    proxy, _ = judge_scores(samples, "proxy_reward")
    meta = prompt_meta(sweep, samples)
    derived = _derived_rows(sweep, scores, proxy, baseline=win_base, n_boot=n_boot, seed=seed,
                            texts=response_texts(samples, scores, prompt_ids), prompt_ids=prompt_ids, meta=meta)
    derived = pd.concat([derived, pd.DataFrame(_as_config_rows(sweep, _view_rows(sweep, samples, scores, prompt_ids,
                                                                                baseline=win_base, n_boot=n_boot,
                                                                                seed=seed)),
                                               columns=list(COLUMNS))], ignore_index=True)
    front = frontier.frontier_data(sweep, samples, n_boot=n_boot, seed=seed)
    fnd = findings.findings_data(front, samples, n_boot=n_boot, seed=seed, sweep=sweep.name, run="")
    derived = pd.concat([derived, pd.DataFrame(front.rows + fnd.rows, columns=list(COLUMNS))], ignore_index=True)
    points = points_frame(train_points(sweep))
    deltas = nlp_deltas(agg, base)
    cost = cost_frame(sweep, samples, n_boot=n_boot, seed=seed)
    stage_times, run_times = walltime.stage_frame(sweep), walltime.run_frame(sweep)
    time_rows = walltime.time_rows(sweep, stage_times, run_times)
    write_rows(out_dir / "results.csv", pd.concat([rows, derived, *([pd.DataFrame(time_rows)] if time_rows else [])],
                                                  ignore_index=True))

    shown = (agg["evaluator"] == PM_EVAL) | ((agg["evaluator"] == "nlp_tasks") & (agg["metric"] == "acc")) | \
        ((agg["evaluator"] == "policy") & (agg["metric"] == "truncation_rate")) | (agg["evaluator"] == "diversity") | \
        ((agg["evaluator"] == "temperature") & (agg["metric"] == "judge_reward")) | (agg["evaluator"] == "gatt")
    ok = len(sweep.ok_runs)
    made_by = ", then ".join(c for c in (sweep.command, command) if c)
    blocks = [Heading(f"alignbench report: {sweep.name}", 1),
              *([Para(f"Made by: {made_by}")] if made_by else []),
              Para(f"{ok} of {len(sweep.runs)} runs usable. Runs marked otherwise are left out of every number. "
                   "A configuration is a method with its own overrides; its runs differ only by seed, and only "
                   "they are combined. All rows are in results.csv."),
              *(Note(n) for n in notes),
              Heading("Findings"),
              *findings.findings_blocks(fnd, findings.headline_frame(fnd, derived, cost, win_base), win_base,
                                        judge=findings.judge_sentence(sweep, samples, agg),
                                        figure=frontier.frontier_figure(front, out_dir, _figure),
                                        is_pi0=win_base == base),
              *companions,  # the sub-folders' reports, read where they are (the final directory)
              Heading("Runs"), tables.runs_table(sweep, cost),
              Heading("Configurations"), tables.config_table(sweep, cost, derived, agg=agg, baseline=win_base),
              *chains.chain_blocks(sweep),
              Heading("Evaluation prompts"),
              *_table(tables.prompt_mix_table(meta, "subset"), "the samples record no subset (runs from before it)"),
              *_table(tables.prompt_mix_table(meta, "n_turns"), "the samples record no number of Human turns"),
              *_table(tables.subset_table(derived, win_base), "no subsets recorded, or no judged samples"),
              Heading("Preference model"),
              *_table(tables.pm_turn_table(agg), "no PM accuracy-by-turn rows"),
              *_figure(out_dir, "pm_accuracy_by_turn.png", lambda p: plots.accuracy_by_turn(agg, p),
                       "PM accuracy by number of Human turns", "no PM accuracy-by-turn rows"),
              *_table(tables.calibration_table(agg), "no PM calibration rows"),
              *_figure(out_dir, "pm_calibration.png", lambda p: plots.calibration(agg, p),
                       "PM calibration against the diagonal", "no PM calibration rows"),
              *_table(tables.threshold_table(agg), "no PM threshold rows"),
              *_figure(out_dir, "pm_threshold.png", lambda p: plots.accuracy_vs_threshold(agg, p),
                       "PM accuracy when both scores exceed a threshold", "no PM threshold rows"),
              *_table(tables.gold_table(agg), "no gold-agreement rows (only on hh_synth)"),
              *pm_objectives.pm_objective_blocks(sweep, agg, out_dir, _figure),
              *safety_distill_blocks(sweep, agg),
              Heading("Win rates and Elo"),
              *_table(tables.win_table(derived), "fewer than two configurations with usable samples"),
              *_table(tables.elo_table(derived), "fewer than two configurations with usable samples"),
              *_table(views.vs_chosen_table(derived, win_base),
                      "no win rate against the chosen response (the samples record no chosen_judge_reward)"),
              *_figure(out_dir, "win_rates.png", lambda p: plots.win_matrix(derived, p),
                       "Win-rate matrix and Elo", "fewer than two configurations with usable samples"),
              Heading("Reward–KL frontier"),
              *frontier.frontier_blocks(front, derived),
              *_bon_block(tables.bon_kl_table(derived)),
              *_figure(out_dir, "reward_vs_kl.png", lambda p: plots.reward_vs_kl(points, p),
                       "Proxy and judge reward vs sqrt(KL) per configuration, with fitted curves where there are enough "
                       "points (p + 2 distinct d)", "no train_log points with KL"),
              *_view_blocks(out_dir, derived, agg, samples, points=train_points(sweep), baseline=win_base),
              *iterated.iterated_blocks(sweep, out_dir, _figure),
              *safety.safety_blocks(sweep),
              *gatt.gatt_blocks(sweep, out_dir, _figure),
              Heading("NLP task regressions"),
              *_table(tables.nlp_table(deltas, base), f"no nlp_tasks acc rows for {base} and another configuration"),
              *_figure(out_dir, "nlp_deltas.png", lambda p: plots.nlp_deltas(deltas, base, p),
                       f"NLP task accuracy minus {base}'s", "no NLP deltas"),
              Heading("Cost vs quality"),
              Para("wall s excludes measurement (KL and reward points along training), shown as measure s; "
                   "FLOPs count the training, generation and PM compute charged to the run."),
              *_figure(out_dir, "cost_quality.png", lambda p: plots.cost_vs_quality(cost, p),
                       "Mean judge reward against wall time and tokens generated", "no cost or judge reward"),
              *_figure(out_dir, "quality_flops.png", lambda p: plots.cost_vs_quality(cost, p, keys=("flops",)),
                       "Mean judge reward against FLOPs", "no run records FLOPs (runs from before the field)"),
              Heading("Where the time goes"),
              *walltime.time_blocks(sweep, stage_times, run_times),
              *_figure(out_dir, "wall_time.png", lambda p: walltime.time_plot(stage_times, run_times, p),
                       "Seconds per shared stage build and per run phase", "no run records its wall-time breakdown"),
              Heading("Sample responses"),
              *_sample_block(samples, prompt_ids, sorted(scores)),
              Heading("Other results"),
              *_table(tables.other_rows_table(agg[~shown]), "every row is shown above"),
              Heading("Intervals"), *(Para(t) for t in INTERVALS)]

    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "index.html").write_text(to_html(blocks, f"alignbench report: {sweep.name}"), encoding="utf-8")

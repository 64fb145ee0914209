"""Method chaining: ``method=chain`` (stages in one run) and ``init.from_run`` (a run continuing
another run's policy): starts, anchors, accumulated costs, the metrics.json chain record, bad
input before any training, and a resume after a kill inside a later stage."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignbench.chain import add_cost, check_source, resolve_run_dir
from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.cost import Cost
from alignbench.run_evaluation import build_context
from alignbench.policy_measures import method_family
from alignbench.runner import run_job, validate
from alignbench.report.build import build_report
from tests.conftest import TINY
from tests.test_report import sweep  # noqa: F401 (fixture)

# two short stages: Preferred-FT (SFT on chosen responses) then DPO, 4 steps each
PFT = "{name:preferred_ft,max_steps:4,eval_every:2}"
DPO = "{name:dpo,max_steps:4,eval_every:2}"
CHAIN = ["method=chain", f"method.stages=[{PFT},{DPO}]", "eval.n_prompts=8"]
COUNTS = ("tokens_trained", "tokens_generated", "pm_calls", "annotations")


def _run(overrides: list[str]) -> dict:
    return run_job(compose(overrides), [o for o in overrides if o.startswith(("method", "init"))])


def _log(sweep: Path, metrics: dict) -> list[dict]:
    text = (sweep / "runs" / metrics["run_id"] / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_add_cost_continues_every_counter_and_the_clock():
    cost = Cost(tokens_trained=5, pm_calls=2, flops=1.0)
    wall_before = cost.wall_s()
    add_cost(cost, {"wall_s": 100.0, "tokens_trained": 10, "tokens_generated": 7, "pm_calls": 3, "flops": 2.5,
                    "annotations": 4, "measure_s": 20.0})
    assert (cost.tokens_trained, cost.tokens_generated, cost.pm_calls, cost.flops, cost.annotations) == (15, 7, 5, 3.5, 4)
    assert cost.measure_s == 20.0
    assert cost.wall_s() == pytest.approx(wall_before + 100.0, abs=0.5)


def test_from_run_resolves_a_sweep_path_or_a_name_under_the_sweeps_root(tmp_path):
    (tmp_path / "mine").mkdir()
    assert resolve_run_dir(f"{tmp_path}/mine/dpo_s0", "sweeps/x") == tmp_path / "mine" / "runs" / "dpo_s0"
    assert resolve_run_dir("demo/ppo_s0", str(tmp_path / "sweeps" / "x")) == tmp_path / "sweeps" / "demo" / "runs" / "ppo_s0"
    with pytest.raises(ConfigError, match="^init.from_run: expected <sweep>/<run_id>"):
        resolve_run_dir("just_a_run", "sweeps/x")


def test_chain_stages_start_from_the_previous_policy_and_costs_add_up(tiny_overrides, tmp_path):
    chain = _run(tiny_overrides + CHAIN)
    sweep = Path(tiny_overrides[-1].split("=", 1)[1])
    log = _log(sweep, chain)
    second = [p for p in log if p.get("chain_stage") == 1]
    # the second stage's first point is its start, the first stage's policy: KL 0 to it, > 0 to π0
    assert second[0]["label"] == "stage 1 start"
    assert abs(second[0]["kl_k3_start"]) < 1e-5 and second[0]["kl_k3"] > 1e-4
    first_end = [p for p in log if p.get("chain_stage") == 0][-1]
    assert second[0]["judge_reward"] == first_end["judge_reward"]  # the same policy, the same eval samples
    assert [p["step"] for p in log] == [0, 2, 4, 4, 6, 8, -1]  # one step axis over both stages
    assert chain["info"]["stages"][1]["method"] == "dpo" and chain["info"]["stages"][1]["steps"] == 8
    assert [s["method"] for s in chain["chain"]] == ["preferred_ft", "dpo"]
    # the chain's final policy (the last stage's) can start another chain
    source = check_source(validate(compose(tiny_overrides + [f"init.from_run='{sweep}/{chain['run_id']}'"]))[0])
    assert source.policy == sweep / "runs" / chain["run_id"] / "subruns" / "01-dpo" / "policy"
    assert [s["method"] for s in source.chain] == ["preferred_ft", "dpo"]
    # the same two stages run alone (DPO from π0: the same steps and data): the chain spent their sum
    alone = [_run(tiny_overrides + [f"paths.sweep_dir={tmp_path}/{n}", "eval.n_prompts=8", f"method={n}",
                                    "method.max_steps=4", "method.eval_every=2"]) for n in ("preferred_ft", "dpo")]
    for key in COUNTS:
        assert chain["cost"][key] == sum(a["cost"][key] for a in alone), key
    assert chain["cost"]["flops"] == pytest.approx(sum(a["cost"]["flops"] for a in alone), rel=1e-9)
    assert chain["cost"]["tokens_trained"] > 0


def test_from_run_starts_at_the_source_policy_and_continues_its_cost(tiny_overrides, tmp_path):
    pft = ["method=preferred_ft", "method.max_steps=4", "method.eval_every=2", "eval.n_prompts=8"]
    source = _run(tiny_overrides[:-1] + [f"paths.sweep_dir={tmp_path}/sft"] + pft)
    dpo = ["method=dpo", "method.max_steps=4", "method.eval_every=2", "eval.n_prompts=8"]
    alone = _run(tiny_overrides[:-1] + [f"paths.sweep_dir={tmp_path}/alone"] + dpo)
    cont = _run(tiny_overrides[:-1] + [f"paths.sweep_dir={tmp_path}/cont", f"init.from_run='{tmp_path}/sft/{source['run_id']}'"]
                + dpo)
    log = _log(tmp_path / "cont", cont)
    assert [p["label"] for p in log[:2]] == ["pi0", "start"]
    assert log[0]["tokens_trained"] == 0  # π0 costs nothing; the start carries the source's cost
    for key in COUNTS:
        assert log[1][key] == source["cost"][key], key
        assert cont["cost"][key] == source["cost"][key] + alone["cost"][key], key
    assert cont["cost"]["wall_s"] > source["cost"]["wall_s"]  # the source's seconds, then its own
    assert abs(log[1]["kl_k3_start"]) < 1e-5 and log[1]["kl_k3"] > 1e-4
    # init.reference=start: DPO's reference is the start policy, so its implicit rewards start at 0
    assert abs(cont["info"]["initial_reward_margin"]) < 1e-4 and abs(alone["info"]["initial_reward_margin"]) < 1e-4
    assert "kl_k3_start" in cont["final"] and "kl_k3_start" not in alone["final"]
    assert cont["chain"] == [{"method": "preferred_ft", "config": source["config"], "run": f"sft/{source['run_id']}"},
                             {"method": "dpo", "config": cont["config"], "run": f"cont/{cont['run_id']}"}]
    # a run continuing the continuation lists the whole chain
    again = validate(compose(tiny_overrides + [f"init.from_run='{tmp_path}/cont/{cont['run_id']}'",
                                               "init.reference=pi0"] + dpo))[0]
    src = check_source(again)
    assert [s["method"] for s in src.chain] == ["preferred_ft", "dpo"]
    ctx = build_context(again, None, tmp_path / "ctx", source=src)
    assert ctx.start_path == src.policy and ctx.reference_path is None  # init.reference=pi0


def _fake_run(sweep: Path, run_id: str, status: str, done: bool, stages=None, policy: bool = True) -> str:
    run = sweep / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": status}))
    if done:
        (run / "DONE").write_text("")
    (run / "metrics.json").write_text(json.dumps({"method": "dpo", "family": "dpo", "config": "dpo", "run_id": run_id,
                                                  "stages": stages or {}, "cost": {"wall_s": 1.0}, "info": {}}))
    if policy:
        (run / "policy").mkdir()
        (run / "policy" / "config.json").write_text("{}")
    return f"{sweep}/{run_id}"


@pytest.mark.parametrize("case,match", [
    ("missing", "no run directory"),
    ("failed", "has not finished \\(status: failed\\)"),
    ("running", "has not finished \\(status: running\\)"),
    ("sampler", "has no policy weights"),
])
def test_bad_source_run_fails_before_training_naming_the_key(case, match, tiny_overrides, tmp_path):
    spec = {"missing": lambda: f"{tmp_path}/nowhere/dpo_s0",
            "failed": lambda: _fake_run(tmp_path / "src", "dpo_s0", "failed", done=False),
            "running": lambda: _fake_run(tmp_path / "src", "dpo_s0", "running", done=False),
            "sampler": lambda: _fake_run(tmp_path / "src", "bon_s0", "done", done=True, policy=False)}[case]()
    with pytest.raises(ConfigError, match=f"^init.from_run: .*{match}"):
        validate(compose(tiny_overrides + [f"init.from_run={spec}", "method=dpo"]))


def test_source_on_other_shared_stages_fails_before_training(tiny_overrides, tmp_path):
    ours = run_job(compose(tiny_overrides + ["method=context_distilled", "eval.n_prompts=8"]), [])["stages"]
    spec = _fake_run(tmp_path / "src", "dpo_s0", "done", done=True, stages={**ours, "pi0": "another-pi0"})
    overrides = tiny_overrides[:-1] + [f"paths.sweep_dir={tmp_path}/cont", f"init.from_run={spec}", "method=dpo"]
    with pytest.raises(ConfigError, match="^init.from_run: .* another pi0 stage"):
        run_job(compose(overrides), [])
    run = next((tmp_path / "cont" / "runs").iterdir())
    assert not (run / "train_log.jsonl").exists()  # nothing was measured or trained
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("stages,match", [
    (f"[{PFT},{{name:dpo,betta:1}}]", r"^method.stages\[1\].betta: unknown key"),
    (f"[{PFT},{{name:dpo,beta:-1}}]", r"^method.stages\[1\].beta: must be > 0"),
    (f"[{{name:nope}},{DPO}]", r"^method.stages\[0\].name: unknown method 'nope'"),
    (f"[{{name:rejection_sampling,mode:best_of_n}},{DPO}]", r"^method.stages\[0\].mode: .*only the last stage"),
    (f"[{DPO}]", r"^method.stages: a chain needs at least two stages"),
])
def test_bad_stage_fails_before_training_naming_its_key(stages, match, tiny_overrides):
    with pytest.raises(ConfigError, match=match):
        validate(compose(tiny_overrides + ["method=chain", f"method.stages={stages}"]))


@pytest.mark.slow
def test_chain_killed_inside_its_second_stage_resumes_and_matches_uninterrupted(stage_cache, tmp_path):
    """SIGKILL a chain inside stage 2 after a checkpoint there; the re-run skips stage 1 (its done
    record), resumes stage 2 from its checkpoint and ends exactly as an uninterrupted chain (CPU)."""
    dpo = "{name:dpo,max_steps:8,eval_every:2}"
    common = [sys.executable, "-m", "alignbench.cli", "run", "method=chain", f"method.stages=[{PFT},{dpo}]",
              "train.checkpoint_every=2", "eval.n_prompts=8", "train.num_threads=1", *TINY,
              f"paths.cache_dir={stage_cache}"]
    subprocess.run(common + [f"paths.sweep_dir={tmp_path}/clean"], check=True, capture_output=True, cwd=tmp_path)
    clean = json.loads(next((tmp_path / "clean" / "runs").glob("*/metrics.json")).read_text())
    killed = common + [f"paths.sweep_dir={tmp_path}/killed"]
    proc = subprocess.Popen(killed, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, states = time.time() + 300, []
    while time.time() < deadline:
        states = list((tmp_path / "killed" / "runs").glob("*/subruns/01-dpo/checkpoint/state.json"))
        if states and json.loads(states[0].read_text())["step"] >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = states[0].parents[3]
    assert not (run_dir / "DONE").exists(), "the chain finished before it could be killed"
    assert (run_dir / "subruns" / "00-preferred_ft" / "done.json").exists()
    out = subprocess.run(killed, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "resuming from checkpoint" in out.stdout + out.stderr
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("proxy_reward", "judge_reward", "kl_k1", "kl_k3"):
        assert resumed["final"][key] == clean["final"][key], key  # bitwise on CPU
    for key in ("tokens_trained", "tokens_generated", "pm_calls", "flops"):
        assert resumed["cost"][key] == clean["cost"][key], key
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    clean_log = (tmp_path / "clean" / "runs" / run_dir.name / "train_log.jsonl").read_text().splitlines()
    assert [p["step"] for p in log] == [json.loads(line)["step"] for line in clean_log] == [0, 2, 4, 4, 6, 8, 10, 12, -1]
    for a, b in zip(log, map(json.loads, clean_log)):
        assert a["judge_reward"] == b["judge_reward"] and a.get("kl_k3") == b.get("kl_k3"), a["step"]


def test_report_lists_a_chain_as_one_configuration_with_its_stages_and_kls(sweep, tmp_path):  # noqa: F811
    for seed, (kl, kl_start, last) in enumerate([(0.4, 0.4, 0.1), (0.6, 0.6, 0.3)]):
        path = sweep / "runs" / f"dpo-{seed}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics.update(final={"judge_reward": 1.0 + seed, "kl_k3": kl}, cost={**metrics["cost"], "flops": 2e9},
                       chain=[{"method": "preferred_ft", "config": "chain", "run": "fake/dpo-0", "stage": 0},
                              {"method": "dpo", "config": "chain", "run": "fake/dpo-0", "stage": 1}],
                       info={"stages": [{"kl_k3_start": 0.0}, {"kl_k3_start": last}]})
        path.write_text(json.dumps(metrics))
    md = build_report(sweep, tmp_path / "report", n_boot=200).read_text()
    assert "## Chains" in md
    # seeds combined: judge (1 + 2) / 2, KL to π0 = to the chain's start (it starts at π0), last stage 0.2
    assert "| dpo | preferred_ft → dpo | 2 | 1.500 | 0.500 | 0.500 | 0.200 | 2e+09 |" in md


def test_report_of_a_sweep_without_chains_has_no_chain_section(sweep, tmp_path):  # noqa: F811
    assert "Chains" not in build_report(sweep, tmp_path / "report", n_boot=200).read_text()


@pytest.mark.parametrize("preset,stages,alone", [
    ("chain_rs_ppo", ["rs_finetune", "ppo"], {"rejection_sampling": ("rounds", 1), "ppo": ("steps", 2)}),
    ("chain_pft_dpo", ["preferred_ft", "dpo"], {"preferred_ft": ("max_steps", 40), "dpo": ("max_steps", 40)}),
])
def test_chain_presets_compose_the_chain_and_its_stages_alone_with_the_same_settings(preset, stages, alone):
    cfg, mcfg, _ = validate(compose([f"experiment={preset}", "method=chain"]))
    resolved = mcfg.resolved()
    assert [method_family(m.name, m) for _, m in resolved] == stages and mcfg.reference == "start"
    for (_, stage), (name, (key, value)) in zip(resolved, alone.items()):
        single = validate(compose([f"experiment={preset}", f"method={name}"]))[1]
        assert getattr(stage, key) == getattr(single, key) == value
        assert stage == single  # the stage alone is the same method config


def test_best_of_n_at_the_end_of_a_chain_serves_from_the_previous_stage_and_adds_its_kl_to_pi0(tiny_overrides,
                                                                                                 tmp_path):
    # issue 24 §1.5: best-of-n sampled ctx.reference() (π0 here), so the first stage was thrown away
    # while its cost was charged, and its KL bound (to the start) was read as KL to π0
    from methods.rejection_sampling import bon_kl_bound
    bon = "{name:rejection_sampling,mode:best_of_n,n:2,kl_pool:2}"
    chained = _run(tiny_overrides + ["method=chain", f"method.stages=[{{name:preferred_ft,max_steps:6,lr:3e-3}},"
                                     f"{bon}]", "method.reference=pi0", "eval.n_prompts=8"])
    alone = _run(tiny_overrides + ["method=rejection_sampling", "method.n=2", "method.kl_pool=2", "eval.n_prompts=8",
                                   f"paths.sweep_dir={tmp_path / 'alone'}"])
    served = [p for p in _log(tmp_path / "sweep", chained) if p.get("label") == "n=2"][-1]
    assert served["kl_bound_start"] == pytest.approx(bon_kl_bound(2))
    # KL(BoN‖π0) = KL(BoN‖start) + E[log start/π0] over its samples: the fine-tuned start is away from π0
    assert served["kl_bound"] > served["kl_bound_start"] + 1e-3
    assert chained["final"]["kl_bound"] == pytest.approx(served["kl_bound"])
    assert chained["final"]["judge_reward"] != alone["final"]["judge_reward"]  # not π0's best-of-2

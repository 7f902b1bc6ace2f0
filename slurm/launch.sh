#!/usr/bin/env bash
# Shared launcher for the sbatch scripts in this folder (sourced by them, not submitted directly).
# Runs one torchrun agent per node under srun (megatron_pz.runtime.launcher: torchrun that holds SIGTERM/SIGUSR1
# from its first moment and forwards them to the ranks instead of killing them); every rank runs
# `megatron-pz train`. Re-submitting the same job (or a requeue) resumes from $RUN_DIR/checkpoints.
#
# In order, each attempt of the job (a requeued job runs this script again, same job id, SLURM_RESTART_COUNT
# + 1; --open-mode=append keeps every attempt's output in one file, each after a "launch.sh: job J attempt N"
# line):
# 1. the run directory's lock: a second job on the same RUN_DIR stops here (exit 2, naming the job that has it);
# 2. `megatron-pz plan` for the allocation, with the time the job has left: exit 2 when the split does not add
#    up, or when the time limit is not longer than the early warning's lead plus start-up
#    (preemption.startup_seconds): such a job would be warned before its first step on every attempt;
# 3. the one-time HF import (under the lock);
# 4. the training step; then `python -m megatron_pz.runtime.requeue` ends the job: 75 for a stop with its
#    checkpoint written (requeued on SIGUSR1 when the attempt finished at least one RL step), 0 when every step
#    ran, the failure's code otherwise (not requeued).
#
# Stop signals: the scripts ask SLURM for SIGUSR1 `--signal=B:USR1@LEAD` seconds before the time limit (the lead
# `megatron-pz plan` prints), sent to this batch shell only, which lives through the whole job: a warning sent
# to the job's steps instead (`--signal=USR1@...`) is lost when none is running (during the plan or the HF
# import). Before the training step a stop signal is held and the ranks are not started (nothing trained: not
# requeued); during it, SIGUSR1 is forwarded to the step (srun sends it to every process of the step on every
# node). A time limit, scancel or a preemption send SIGTERM to every process of the job themselves. The ranks
# finish the phase they are in, write one checkpoint together and exit 75; this script waits for them.
#
# Inputs (environment): CONFIG (YAML), MODEL_DIR (Hugging Face model folder), RUN_DIR (output),
# optional DATA_DIR (preprocessed passages), VENV (python env to activate), EXTRA_OVERRIDES, GPUS_PER_NODE (8),
# MASTER_PORT (default: 20000 + job id mod 20000, so that jobs sharing a node do not collide).
set -euo pipefail

: "${CONFIG:?set CONFIG to a run YAML under examples/}"
: "${MODEL_DIR:?set MODEL_DIR to the Hugging Face model folder (config.json + safetensors)}"
: "${RUN_DIR:?set RUN_DIR to a shared output folder}"
export MODEL_DIR RUN_DIR
export DATA_DIR="${DATA_DIR:-$RUN_DIR/data}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
[[ -n "${VENV:-}" ]] && source "$VENV/bin/activate"

# A trap runs once the foreground command (the plan, the HF import) returns, or at once in `wait` below.
STOP=""      # the first stop signal this shell got
SRUN_PID=""  # the training step, once started
on_stop() {
  STOP="${STOP:-$1}"
  if [[ -z "$SRUN_PID" ]]; then
    echo "launch.sh: SIG$1 before the ranks started: holding it; they will not be started"
  elif [[ "$1" == USR1 ]]; then
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
    echo "launch.sh: SIGUSR1 forwarded to the training step; waiting for the ranks to write their checkpoint"
  else  # SLURM sent it to every process of the step too
    echo "launch.sh: SIGTERM; waiting for the ranks to write their checkpoint"
  fi
}
trap 'on_stop USR1' USR1
trap 'on_stop TERM' TERM
stop_before_ranks() {
  [[ -z "$STOP" ]] && return 0
  echo "job: stopped on SIG$STOP before the ranks started (nothing trained in this attempt): not requeued;" \
    "resubmit to continue"
  exit 75
}

mkdir -p "$RUN_DIR/logs"
LOG="$RUN_DIR/logs/train-$SLURM_JOB_ID.log"
echo "launch.sh: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname -s) at $(date '+%F %T')" \
  | tee -a "$LOG"

# 1. One job per run directory: a second one stops here, before it takes the GPUs (the ranks take the lock for
# the run itself); a lock whose holder is gone (its SLURM job ended, an earlier attempt of this job) is taken over.
python -m megatron_pz.runtime.run_lock "$RUN_DIR" -- true

# 2. Before the GPUs are taken: the per-GPU budget of every phase, and for rollout.placement=disaggregated the
# split (the job's last rollout.ranks ranks generate, the others train) with one budget per role. A split
# that does not add up (no trainer left, parallel sizes that do not divide the training ranks, passages
# that do not divide into units) or a time limit too short for the early warning stops here (exit 2); an
# unfit memory budget is refused by `train` itself at start-up (runtime.memory_plan). With c10d rendezvous
# torchrun numbers ranks node by node in rendezvous order, so a rollout.ranks that is a multiple of
# GPUS_PER_NODE gives the rollout role whole nodes.
TIME_LEFT="$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)"
plan_status=0
megatron-pz plan "$CONFIG" ${EXTRA_OVERRIDES:-} --nodes "$SLURM_NNODES" --gpus-per-node "$GPUS_PER_NODE" \
  ${TIME_LEFT:+--time-limit "$TIME_LEFT"} > "$RUN_DIR/logs/plan-$SLURM_JOB_ID.txt" 2>&1 || plan_status=$?
cat "$RUN_DIR/logs/plan-$SLURM_JOB_ID.txt"
if [[ $plan_status -ge 2 && $plan_status -lt 128 ]]; then  # before a held signal: a time limit too short
  echo "launch: $CONFIG on $SLURM_NNODES x $GPUS_PER_NODE GPUs refused before taking them (see above)" >&2
  exit 2                                                    # for the warning brings the warning at once
fi
stop_before_ranks
if [[ $plan_status -ge 128 ]]; then
  echo "launch: megatron-pz plan was killed (exit $plan_status)" >&2
  exit "$plan_status"
fi

# 3. One-time import of the HF weights into a Megatron distributed checkpoint (resharded on load, so
# one CPU process at TP=PP=EP=1 suffices for any training layout), under the run directory's lock.
INIT_CKPT="$RUN_DIR/init"
if [[ ! -f "$INIT_CKPT/latest_checkpointed_iteration.txt" ]]; then
  srun --nodes=1 --ntasks=1 python -m megatron_pz.runtime.run_lock "$RUN_DIR" -- \
    megatron-pz convert hf-to-megatron --hf "$MODEL_DIR" --out "$INIT_CKPT" --tp 1 --pp 1 --ep 1 --device cpu
fi
stop_before_ranks

# 4. Training. START_STEP: where this attempt resumes (an attempt that ends on the early warning without
# finishing a step past it is not requeued: that loop would make no progress). The launcher starts with the
# stop signals blocked where env can do it (GNU coreutils >= 8.31): one that reaches the step while Python
# starts is held, not fatal (the launcher then holds them itself, and its ranks until their handlers are up).
START_STEP="$(cat "$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
WORLD_SIZE=$((SLURM_NNODES * GPUS_PER_NODE))
HOLD=()
if env --block-signal=USR1 true 2>/dev/null; then HOLD=(env --block-signal=TERM,USR1); fi

# NCCL / PyTorch settings for multi-node H100 (InfiniBand); override per cluster as needed.
export CUDA_DEVICE_MAX_CONNECTIONS=1          # Megatron TP/SP comm-compute overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # fail fast instead of hanging on a dead rank
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_QPS_PER_CONNECTION="${NCCL_IB_QPS_PER_CONNECTION:-4}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export VLLM_ALLOW_INSECURE_SERIALIZATION=1   # weight-sync RPC payloads between the actor and vLLM workers
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 "${HOLD[@]}" bash -c "
  exec python -m megatron_pz.runtime.launcher --nnodes=$SLURM_NNODES --nproc_per_node=$GPUS_PER_NODE \
    --node_rank=\$SLURM_NODEID --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT \
    --rdzv_id=$SLURM_JOB_ID \
    -m megatron_pz.cli train '$CONFIG' \
      train.run_dir='$RUN_DIR' train.init_checkpoint='$INIT_CKPT' runtime.world_size=$WORLD_SIZE \
      ${EXTRA_OVERRIDES:-}
" > >(trap '' TERM USR1; exec tee -a "$LOG") 2>&1 &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do
  wait "$SRUN_PID" || true  # returns early (> 128) when a trapped signal arrives
done
rc=0
wait "$SRUN_PID" || rc=$?  # srun's exit status, as bash kept it
python -m megatron_pz.runtime.requeue "$RUN_DIR" "$rc" "$START_STEP"

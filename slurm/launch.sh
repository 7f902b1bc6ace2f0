#!/usr/bin/env bash
# Shared launcher for the sbatch scripts in this folder (sourced by them, not submitted directly).
# Runs one torchrun agent per node under srun (megatron_pz.runtime.launcher: torchrun that forwards
# SIGTERM/SIGUSR1 to the ranks instead of killing them); every rank runs `megatron-pz train`.
# Re-submitting the same job (or a requeue) resumes from $RUN_DIR/checkpoints (train.resume: true).
#
# Stop signals: the sbatch scripts ask SLURM for SIGUSR1 `--signal` seconds before the time limit (the
# lead `megatron-pz plan` prints); a time limit, scancel or a preemption send SIGTERM. Either reaches
# every process of the step; the ranks finish the phase they are in, write one checkpoint together and
# exit 75. This script waits for them through any such signal, then ends the job with
# `python -m megatron_pz.runtime.requeue`: 75 for a stop with its checkpoint written (requeued on
# SIGUSR1), 0 when every step ran, the failure's code otherwise (not requeued).
#
# Inputs (environment): CONFIG (YAML), MODEL_DIR (Hugging Face model folder), RUN_DIR (output),
# optional DATA_DIR (preprocessed passages), VENV (python env to activate), EXTRA_OVERRIDES.
set -euo pipefail

: "${CONFIG:?set CONFIG to a run YAML under examples/}"
: "${MODEL_DIR:?set MODEL_DIR to the Hugging Face model folder (config.json + safetensors)}"
: "${RUN_DIR:?set RUN_DIR to a shared output folder}"
export MODEL_DIR RUN_DIR
export DATA_DIR="${DATA_DIR:-$RUN_DIR/data}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
[[ -n "${VENV:-}" ]] && source "$VENV/bin/activate"

mkdir -p "$RUN_DIR/logs"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
WORLD_SIZE=$((SLURM_NNODES * GPUS_PER_NODE))

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

# Before the GPUs are taken: the per-GPU budget of every phase, and for rollout.placement=disaggregated the
# split (the job's last rollout.ranks ranks generate, the others train) with one budget per role. A split
# that does not add up (no trainer left, parallel sizes that do not divide the training ranks, passages
# that do not divide into units) stops here (exit 2); an unfit budget is refused by `train` itself at
# start-up (runtime.memory_plan). With c10d rendezvous torchrun numbers ranks node by node in rendezvous
# order, so a rollout.ranks that is a multiple of GPUS_PER_NODE gives the rollout role whole nodes.
plan_status=0
megatron-pz plan "$CONFIG" ${EXTRA_OVERRIDES:-} --nodes "$SLURM_NNODES" --gpus-per-node "$GPUS_PER_NODE" \
  > "$RUN_DIR/logs/plan-$SLURM_JOB_ID.txt" 2>&1 || plan_status=$?
cat "$RUN_DIR/logs/plan-$SLURM_JOB_ID.txt"
if [[ $plan_status -ge 2 ]]; then
  echo "launch: $CONFIG does not fit $SLURM_NNODES x $GPUS_PER_NODE GPUs (see above)" >&2
  exit 2
fi

# One-time import of the HF weights into a Megatron distributed checkpoint (resharded on load, so
# one CPU process at TP=PP=EP=1 suffices for any training layout).
# Under the run directory's lock, like training (one writer per run directory).
INIT_CKPT="$RUN_DIR/init"
if [[ ! -f "$INIT_CKPT/latest_checkpointed_iteration.txt" ]]; then
  srun --nodes=1 --ntasks=1 python -m megatron_pz.runtime.run_lock "$RUN_DIR" -- \
    megatron-pz convert hf-to-megatron --hf "$MODEL_DIR" --out "$INIT_CKPT" --tp 1 --pp 1 --ep 1 --device cpu
fi

# An untrapped SIGTERM would end this script, and with it the job, while the ranks write.
trap 'echo "launch.sh: stop signal; waiting for the ranks to write their checkpoint"' TERM USR1
LOG="$RUN_DIR/logs/train-$SLURM_JOB_ID.log"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "
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
python -m megatron_pz.runtime.requeue "$RUN_DIR" "$rc"

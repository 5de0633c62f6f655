#!/bin/bash
# One node's `accelerate launch` for a TinyFlux run under SLURM. slurm/train.sbatch starts it through srun, one task
# per node; every value comes from SLURM's variables of that task:
#   --num_machines       SLURM_NNODES
#   --machine_rank       SLURM_NODEID (this node's index in the allocation)
#   --main_process_ip    the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
#   --main_process_port  MAIN_PORT, else 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node get different ports)
#   --num_processes      SLURM_NNODES x GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, which --gres=gpu:G sets)
# and always `--resume latest`, so a requeued job continues from the newest complete checkpoint (the first start finds
# none and starts from scratch).
#
#   usage: slurm/launch.sh RUN.yaml [more train_tinyflux.py flags]
#   env:   ACCELERATE_CONFIG (default accelerate_configs/multi_node.yaml; fsdp.yaml, deepspeed_zero2.yaml, ... work too),
#          GPUS_PER_NODE, MAIN_PORT, DRY_RUN=1 (print the command instead of running it)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: slurm/launch.sh RUN.yaml [train_tinyflux.py flags]" >&2
    exit 2
fi
run_config=$1
shift
for var in SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST; do
    if [[ -z "${!var:-}" ]]; then
        echo "slurm/launch.sh: $var is not set: run it under srun (slurm/train.sbatch does), or set the SLURM_*" \
            "variables yourself to render the command with DRY_RUN=1" >&2
        exit 2
    fi
done

nnodes=$SLURM_NNODES
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# No `| head -n 1`: under pipefail, scontrol killed by SIGPIPE on a long node list would fail the launch.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
main_ip=${hosts[0]:?"scontrol show hostnames $SLURM_JOB_NODELIST gave no host"}
main_port=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

cmd=(
    accelerate launch
    --config_file "${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}"
    --num_machines "$nnodes"
    --machine_rank "$SLURM_NODEID"
    --main_process_ip "$main_ip"
    --main_process_port "$main_port"
    --num_processes "$((nnodes * gpus_per_node))"
    --rdzv_backend static
    --same_network
    train_tinyflux.py --config "$run_config" --resume latest "$@"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
# exec: the signals srun forwards (USR1 before the time limit, TERM on pre-emption) must reach accelerate's launcher
# (torchrun's agent), which passes them on to the training processes (TORCHELASTIC_SIGNALS_TO_HANDLE, set by the sbatch).
exec "${cmd[@]}"

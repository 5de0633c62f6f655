#!/bin/bash
# One node's `accelerate launch` for a TinyFlux run under SLURM. slurm/train.sbatch starts it through srun, one task
# per node; every value comes from SLURM's variables of that task:
#   --num_machines       SLURM_NNODES
#   --machine_rank       SLURM_NODEID (this node's index in the allocation)
#   --main_process_ip    MAIN_ADDR, else the NodeAddr SLURM has for the first node (`scontrol show node`), which is
#                        its name unless the site set NodeAddr (where node names do not resolve: InfiniBand, containers)
#   --main_process_port  MAIN_PORT, else 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node get different ports)
#   --num_processes      SLURM_NNODES x GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, which --gres=gpu:G sets; 1 on
#                        CPU nodes, submitted with --gres=none)
# and always `--resume latest`, so a requeued job continues from the newest complete checkpoint (the first start finds
# none and starts from scratch).
#
# Exit code: that of the training, except after a stop signal (USR1 before the time limit, TERM on pre-emption or
# scancel): the training processes save and exit 0, but torchrun's agent reports 128 + the signal; a clean
# save-and-stop exits 0 here (so srun --kill-on-bad-exit does not kill another node's launcher while its ranks save),
# and the signal's name is written to TINYFLUX_STOP_FILE for train.sbatch to decide on a requeue.
#
#   usage: slurm/launch.sh RUN.yaml [more train_tinyflux.py flags]
#   env:   ACCELERATE_CONFIG (default accelerate_configs/multi_node.yaml; fsdp.yaml, deepspeed_zero2.yaml, ... work too),
#          GPUS_PER_NODE, MAIN_ADDR, MAIN_PORT, MAIN_ADDR_TIMEOUT (seconds to resolve it, default 30),
#          TINYFLUX_STOP_FILE, DRY_RUN=1 (print the command instead of running it)
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
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# No `| head -n 1`: under pipefail, scontrol killed by SIGPIPE on a long node list would fail the launch.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
main_node=${hosts[0]:?"scontrol show hostnames $SLURM_JOB_NODELIST gave no host"}
if [[ -n "${MAIN_ADDR:-}" ]]; then
    main_ip=$MAIN_ADDR
    where="MAIN_ADDR"
else
    # NodeAddr defaults to the node's name; where a site sets it, the name itself may not resolve.
    main_ip=$(scontrol show node "$main_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    main_ip=${main_ip:-$main_node}
    where="NodeAddr of $main_node (scontrol show node)"
fi
main_port=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
if [[ "${DRY_RUN:-0}" != 1 ]] && ! timeout "${MAIN_ADDR_TIMEOUT:-30}" getent ahosts "$main_ip" >/dev/null; then
    echo "slurm/launch.sh: the main address $main_ip ($where) does not resolve within ${MAIN_ADDR_TIMEOUT:-30} s" \
        "on $(hostname): set MAIN_ADDR to an address of $main_node that every node reaches" >&2
    # srun reports a task's exit before that task's last output (--kill-on-bad-exit then ends the step): once, in a
    # full test run on 2026-12-07, this line never reached the job's output. Give it time to arrive first.
    sleep 2
    exit 1
fi

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
# Not exec: srun's signals reach every process of the step (scancel, pre-emption, scancel --signal=USR1; train.sbatch
# sends its USR1 the same way), torchrun's agent included, which passes them to the training processes
# (PET_SIGNALS_TO_HANDLE, set by the sbatch). This shell only notes the signal and turns its clean end into 0.
stop_file=${TINYFLUX_STOP_FILE:-${TMPDIR:-/tmp}/tinyflux-${SLURM_JOB_ID:-0}.stop}
stopped=
note() {
    stopped=$1
    echo "$1" >"$stop_file"
}
trap 'note USR1' USR1
trap 'note TERM' TERM
"${cmd[@]}" &
pid=$!
status=0
while true; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break # a trapped signal ends `wait` early: wait again until the launcher exits
done
if [[ -n $stopped ]]; then
    signum=$(kill -l "$stopped")
    if [[ $status == 0 || $status == $((128 + signum)) ]]; then
        echo "slurm/launch.sh: $stopped: the training saved and stopped (accelerate launch exited $status): exit 0" >&2
        exit 0
    fi
fi
exit "$status"

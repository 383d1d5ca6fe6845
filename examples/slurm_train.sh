#!/bin/bash
# examples/slurm_train.sh: train.py on several nodes under SLURM, one process per GPU, resumable.
#
#   cd amused && sbatch --nodes 4 examples/slurm_train.sh --checkpoint amused/amused-256 --data tokens/ \
#       --out runs/big --batch-size 32 --max-steps 100000 --save-every 1000 --mixed-precision bf16
#
# Submit from the project's folder with its Python environment active (sbatch passes the environment on): the job
# runs where sbatch was called (SLURM runs a copy of this script, so it cannot find the project from its own path).
# Every node runs one torchrun, which starts one train.py per GPU; the torchruns meet at the job's first node
# (c10d rendezvous, port $PORT) and number their processes; rank 0, on whichever node, logs and saves into --out,
# which must be on a file system every node sees (as --data). The examples are numbered over the whole run and each process takes its
# blocks of every global batch (data.py), so any number of nodes sees each example once per epoch; --resume needs
# the same number of processes (and --batch-size, --grad-accum) as the run it continues.
#
# Preemption and time limits: SLURM sends SIGTERM 300 s before the time limit (--signal), torchrun forwards it to
# its workers, and train.py finishes the step, saves and exits; --shutdown-timeout gives them $GRACE seconds before
# torchrun kills. A requeued job (--requeue, or the same sbatch again) finds --out/checkpoint.pt and adds --resume.
#
#SBATCH --job-name=amused
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}  # sbatch --gpus-per-node sets SLURM_GPUS_ON_NODE
PORT=${PORT:-29500}
GRACE=${GRACE:-240}  # seconds torchrun lets a SIGTERMed worker save (a full amused-256 fine-tune writes ~10 GiB)

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f train.py ]]; then
    echo "error: no train.py in $PWD: run sbatch from the amused folder" >&2
    exit 2
fi

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == "--out" ]]; then out="${args[i + 1]:-}"; fi
    if [[ "${args[i]}" == --out=* ]]; then out="${args[i]#--out=}"; fi
done
if [[ -z "$out" ]]; then
    echo "error: pass train.py's arguments, --out included" >&2
    exit 2
fi
resume=()
if [[ -f "$out/checkpoint.pt" ]]; then resume=(--resume); fi

nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # not piped to head: pipefail would fail on its SIGPIPE
head_node=${nodes%%$'\n'*}
threads=$((${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE))
export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))  # the CPU threads of each process

srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    --shutdown-timeout "$GRACE" \
    train.py --device cuda "${args[@]}" "${resume[@]}"

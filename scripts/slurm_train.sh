#!/bin/bash
# Multi-node training of CausalFusion-L (configs/L.yaml) on SLURM: 4 nodes x 8 GPUs, one task per GPU.
# Lightning reads the SLURM environment (SLURM_NTASKS, SLURM_PROCID, ...) and sets up DDP itself; the
# trainer's devices / num_nodes must match the allocation. Submit with: sbatch scripts/slurm_train.sh
#
# Time limit: SLURM sends SIGTERM to every task 2 minutes before it (--signal below). mmfusion stops all
# ranks at the same optimizer step, writes it to OUT/checkpoints/last.ckpt and exits with 143; the job
# then requeues itself and the next run resumes from that step. Preemption sends SIGTERM too, and the
# step is saved if the site's GraceTime leaves time for one step and a save (the default is 0).
# scancel also ends the batch shell, so a cancelled job is not requeued. (Lightning's SIGUSR1
# auto-requeue is switched off by mmfusion: it saves from inside the signal handler, a collective the
# other ranks are not making at that moment.)
#SBATCH --job-name=mmfusion-L
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append  # a requeued job adds to its log
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -uo pipefail
source .venv/bin/activate
OUT=runs/causalfusion_L
# --resume picks up OUT/checkpoints/last.ckpt after a preemption or a time-limit requeue
RESUME=""
[ -f "$OUT/checkpoints/last.ckpt" ] && RESUME="--resume"
srun mmfusion train --config configs/L.yaml $RESUME train.out=$OUT \
    train.devices=8 train.num_nodes=4 train.strategy=ddp train.precision=bf16-mixed \
    data.source=data/coco_karpathy_encoded image.path=stabilityai/sd-vae-ft-ema
code=$?
if [ "$code" -eq 143 ]; then  # stopped by SIGTERM with its state saved: go on in a new allocation
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"

#!/bin/bash
# Multi-node training of CausalFusion-L (configs/L.yaml) on SLURM: 4 nodes x 8 GPUs, one task per GPU.
# Lightning reads the SLURM environment (SLURM_NTASKS, SLURM_PROCID, ...) and sets up DDP itself; the
# trainer's devices / num_nodes must match the allocation. Submit with: sbatch scripts/slurm_train.sh
#SBATCH --job-name=mmfusion-L
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=SIGUSR1@120
set -euo pipefail
source .venv/bin/activate
# --resume picks up OUT/checkpoints/last.ckpt after a preemption or a time-limit requeue
RESUME=""
[ -f runs/causalfusion_L/checkpoints/last.ckpt ] && RESUME="--resume"
srun mmfusion train --config configs/L.yaml $RESUME \
    train.devices=8 train.num_nodes=4 train.strategy=ddp train.precision=bf16-mixed \
    data.source=data/coco_karpathy_encoded image.path=stabilityai/sd-vae-ft-ema

#!/bin/sh
# Train every system that benchmarks/bench_claims.py compares, for one training seed, with the shipped synthetic
# recipes (only train.seed and the paths that chain the runs change):
#
#   sh benchmarks/train_claims.sh SEED [RUNS]      # writes RUNS/seedSEED/<system>/ (RUNS: runs/claims)
#
# VIT=FILE / RN=FILE start from other tiny-CLIP weights than the shipped ones (e.g. a new `ovdense train clip`
# run); DEVICE=cuda trains on a GPU. Each run resumes where it stopped when the script is run again.
set -eu
seed=${1:?usage: sh benchmarks/train_claims.sh SEED [RUNS]}
runs=${2:-runs/claims}/seed$seed
vit=${VIT:-synthetic}
rn=${RN:-synthetic}
device=${DEVICE:-auto}

train() {  # train WHAT RECIPE SYSTEM [--set KEY=VALUE ...]
    what=$1 recipe=$2 system=$3
    shift 3
    ovdense train "$what" --config "configs/$recipe.yaml" --output "$runs/$system" --device "$device" \
        --set "train.seed=$seed" "$@"
}

train tcl tcl_tiny_synthetic tcl --set "weights=$vit"
train denseclip denseclip_tiny_synthetic denseclip --set "weights=$vit"
train denseclip denseclip_baseline_tiny_synthetic denseclip-baseline --set "weights=$vit"
train rpn rpn_tiny_synthetic rpn --set "weights=$rn"
rpn="rpn=$runs/rpn/rpn.safetensors"
train regionclip-pretrain regionclip_pretrain_tiny_synthetic regionclip-pretrain --set "weights=$rn" --set "$rpn"
train regionclip regionclip_clipinit_tiny_synthetic regionclip-clipinit --set "weights=$rn" --set "$rpn"
train regionclip regionclip_tiny_synthetic regionclip --set "weights=$rn" --set "$rpn" \
    --set "init=$runs/regionclip-pretrain/regionclip-pretrain.safetensors"
train glip glip_tiny_synthetic glip --set "weights=$rn"
train glip glip_a_tiny_synthetic glip-a --set "weights=$rn"
if [ ! -f "$runs/glip-pseudo/pseudo_train.jsonl" ]; then
    ovdense pseudo-label data/synthetic-96/grounding_train.jsonl --skip-boxed --method glip --device "$device" \
        --checkpoint "$runs/glip/glip.safetensors" --threshold 0.5 --output "$runs/glip-pseudo/pseudo_train.jsonl"
fi
train glip glip_student_tiny_synthetic glip-student --set "weights=$rn" \
    --set "data.grounding.1.path=$runs/glip-pseudo/pseudo_train.jsonl"

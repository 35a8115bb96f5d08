#!/usr/bin/env bash
# A full fine-tune of Qwen2.5-VL-7B as users write it: the LLM and the merger, the first two
# LLM blocks frozen, the ViT at a small LR. Audit it (no GPU, no weights):
#
#   mixspec import --from swift examples/import/swift_sft_full.sh
#   mixspec import --from swift examples/import/swift_sft_full.sh -o spec.yaml
NPROC_PER_NODE=8 \
swift sft \
    --model Qwen/Qwen2.5-VL-7B-Instruct \
    --dataset data/train.jsonl \
    --tuner_type full \
    --freeze_aligner false \
    --freeze_parameters model.layers.0 model.layers.1 \
    --vit_lr 2e-6 --aligner_lr 1e-5 --learning_rate 1e-5 \
    --torch_dtype bfloat16 \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 2 \
    --max_length 4096 --num_train_epochs 1 \
    --deepspeed zero3 \
    --eval_steps 200 --save_steps 200 \
    --output_dir runs/qwen25vl-full

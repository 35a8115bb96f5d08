"""Planning: a Spec and a module tree in, the Plan (the single source of truth) and its memory out.

resolve matches each component's modules and builds the Plan (plan); decay decides weight decay
per parameter; quantize and units describe quantized modules and FSDP2 wrap units; policy says in
which dtypes a backend runs the Plan; estimate and activations turn Plan + policy into bytes per
GPU; fit searches the distributed settings that fit a GPU.
"""

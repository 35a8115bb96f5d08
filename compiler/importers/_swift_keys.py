"""Every option ms-swift's `swift sft` and `swift rlhf` accept, listed by
scripts/list_swift_keys.py from the argument parser ms-swift builds (HfArgumentParser over
its argument dataclasses: SftArguments / RLHFArguments in 4.6.0, TrainArguments /
RLHFArguments in 3.12.6, both with transformers 5.19.0's TrainingArguments).
ms-swift stops on any other option (swift/pipelines/base.py: ``raise ValueError(f'remaining_argv:
...')``). Names are written with ``_``; the parser takes ``-`` too.
"""

SFT_4 = frozenset("""
    acc_strategy accelerator_config adalora_beta1 adalora_beta2 adalora_deltaT adalora_init_r
    adalora_orth_reg_weight adalora_target_r adalora_tfinal adalora_tinit adam_beta1 adam_beta2
    adam_epsilon adapter_act adapter_length adapters add_non_thinking_prefix add_version
    agent_template aligner_lr attn_impl auto_find_batch_size average_tokens_across_devices
    batch_eval_metrics bf16 bf16_full_eval bnb_4bit_compute_dtype bnb_4bit_quant_storage
    bnb_4bit_quant_type bnb_4bit_use_double_quant boft_block_num boft_block_size boft_dropout
    boft_n_butterfly_factor cached_dataset cached_val_dataset callbacks check_model columns
    create_checkpoint_symlink custom_dataset_info custom_register_path data_seed
    dataloader_drop_last dataloader_in_order dataloader_multiprocessing_context
    dataloader_num_workers dataloader_persistent_workers dataloader_pin_memory
    dataloader_prefetch_factor dataset dataset_num_proc dataset_shuffle ddp_backend
    ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout
    debug decision_drop_instructions decision_shuffle_fields decision_state_as_text
    decision_subsample_options deepspeed deepspeed_autotp_size device_groups device_map
    disable_auto_column_mapping disable_ignore_empty_think disable_tqdm do_eval do_predict do_train
    download_mode ds3_gather_for_generation early_stop_interval enable_channel_loss enable_dft_loss
    enable_jit_checkpoint enable_npu_model_patch enable_thinking eval_accumulation_steps
    eval_dataset eval_dataset_args eval_delay eval_do_concat_batches eval_generation_config
    eval_limit eval_metric eval_on_start eval_steps eval_strategy eval_use_evalscope
    eval_use_gather_object experts_impl external_plugins extra_eval_args fourier_n_frequency
    fourier_scaling fp16 fp16_full_eval freeze_aligner freeze_llm freeze_parameters
    freeze_parameters_ratio freeze_parameters_regex freeze_vit fsdp fsdp_config full_determinism
    galore_cos_threshold galore_gamma_proj galore_optim_per_parameter galore_proj_bits
    galore_proj_group_size galore_proj_quant galore_proj_type galore_quantization galore_queue_size
    galore_rank galore_scale galore_target_modules galore_update_proj_gap galore_with_embedding
    generation_config generation_max_length generation_num_beams gradient_accumulation_steps
    gradient_checkpointing gradient_checkpointing_kwargs greater_is_better group_by_length help
    hqq_axis hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token
    ignore_args_error ignore_data_skip include_for_metrics include_num_input_tokens_seen
    init_strategy init_weights interleave_prob is_binary_loss_scale label_names
    label_smoothing_factor lazy_tokenize learning_rate length_column_name liger_kernel_config
    lisa_activated_layers lisa_step_interval llamapro_num_groups llamapro_num_new_blocks load_args
    load_best_model_at_end load_data_args load_from_cache_file local_rank local_repo_path log_level
    log_level_replica log_on_each_node logging_dir logging_first_step logging_nan_inf_filter
    logging_steps logging_strategy logprobs lora_alpha lora_bias lora_dropout lora_dtype
    lora_ga_batch_size lora_ga_direction lora_ga_iters lora_ga_max_length lora_ga_scale
    lora_ga_stable_gamma lora_rank lorap_lr_ratio loss_scale loss_type lr_scheduler_kwargs
    lr_scheduler_type max_epochs max_grad_norm max_length max_memory max_model_len max_new_tokens
    max_pixels max_shard_size max_steps metric_for_best_model model model_author model_kwargs
    model_name model_revision model_type modules_to_save mrl_dims neftune_noise_alpha
    new_special_tokens no_add_non_thinking_prefix no_add_version no_average_tokens_across_devices
    no_bnb_4bit_use_double_quant no_check_model no_dataloader_in_order
    no_dataloader_persistent_workers no_dataloader_pin_memory no_dataset_shuffle
    no_ds3_gather_for_generation no_enable_npu_model_patch no_eval_do_concat_batches
    no_freeze_aligner no_freeze_vit no_gradient_checkpointing no_log_on_each_node
    no_logging_first_step no_logging_nan_inf_filter no_remove_unused_columns no_safe_serialization
    no_skip_memory_metrics no_train_dataloader_shuffle norm_bbox num_beams num_labels
    num_train_epochs optim optim_args optim_target_modules optimizer output_dir packing
    packing_length packing_num_proc packing_strategy padding_free padding_side parallelism_config
    per_device_eval_batch_size per_device_train_batch_size predict_with_generate
    prediction_loss_only preserve_thinking problem_type project push_to_hub quant_bits quant_method
    ray_exp_name reft_args reft_intervention_type reft_layer_key reft_layers reft_rank
    remove_unused_columns repetition_penalty report_to response_prefix
    restore_callback_states_from_checkpoint resume_from_checkpoint resume_only_model rope_scaling
    router_aux_loss_coef run_name safe_serialization save_on_each_node save_only_model save_steps
    save_strategy save_total_limit seed sequence_parallel_size shuffle_buffer_size
    skip_memory_metrics sortish_sampler split_dataset_ratio stop_words stopping_strategy stream
    streaming strict structured_outputs_regex swanlab_email_language swanlab_exp_name swanlab_mode
    swanlab_notification_method swanlab_project swanlab_receiver_email swanlab_secret
    swanlab_sender_email swanlab_smtp_port swanlab_smtp_server swanlab_token swanlab_webhook_url
    swanlab_workspace system target_modules target_parameters target_regex task_type temperature
    template template_backend tf32 top_k top_logprobs top_p torch_compile torch_compile_backend
    torch_compile_mode torch_dtype torch_empty_cache_steps trackio_bucket_id trackio_space_id
    trackio_static_space_id train_dataloader_shuffle train_sampling_strategy trainable_parameters
    trainable_parameters_regex truncation_strategy tuner_backend tuner_type use_cache
    use_chat_template use_cpu use_dora use_flash_ckpt use_galore use_hf use_liger_kernel
    use_logits_to_keep use_ray use_rslora use_swift_lora val_dataset val_dataset_shuffle
    vera_d_initial vera_dropout vera_projection_prng_key vera_rank vit_gradient_checkpointing vit_lr
    warmup_ratio warmup_steps weight_decay zero_hpz_partition_size
""".split())

RLHF_4 = SFT_4 | frozenset("""
    advantage_estimator advantage_reweight async_generate beta center_rewards_coefficient
    chord_enable_phi_function chord_mu_decay_steps chord_mu_peak chord_mu_valley
    chord_mu_warmup_steps chord_sft_dataset chord_sft_per_device_train_batch_size cliprange
    cliprange_value completion_length_limit_scope cosine_max_len cosine_max_len_value_correct
    cosine_max_len_value_wrong cosine_min_len_value_correct cosine_min_len_value_wrong cpo_alpha
    delta desirable_weight discopop_tau dynamic_sample enable_flattened_weight_sync epsilon
    epsilon_high fipo_clip_high_only fipo_clip_range fipo_decay_rate fipo_safety_threshold gamma
    generation_batch_size gkd_logits_topk gym_env importance_sampling_level kl_coef kl_in_reward
    label_smoothing lam ld_alpha lmbda local_rollout_forward_batch_size log_completions log_entropy
    log_rollout_offpolicy_metrics loss_weights max_completion_length max_resample_times max_turns
    min_p missing_eos_penalty move_model_batches multi_turn_scheduler
    no_enable_flattened_weight_sync no_fipo_clip_high_only no_vllm_disable_custom_all_reduce
    no_vllm_enable_prefix_caching num_generations num_generations_eval num_iterations
    num_mini_batches num_ppo_epochs num_sample_generations off_policy_sequence_mask_delta
    offload_model offload_optimizer offload_teacher_model overlong_filter real_tau ref_adapters
    ref_model ref_model_mixup_alpha ref_model_revision ref_model_sync_steps ref_model_type
    repetition_max_penalty repetition_n_grams response_length reward_adapters reward_funcs
    reward_model reward_model_plugin reward_model_revision reward_model_type reward_template
    reward_weights rlhf_type rlsd_lambda rlsd_lambda_decay_steps rlsd_lambda_warmup_steps
    rlsd_negative_only rlsd_reweight_clip_range rollout_importance_sampling_mode
    rollout_importance_sampling_threshold rpo_alpha scale_rewards sdar_gate_beta sdar_loss_coef
    seq_kd sft_alpha simpo_gamma sleep_level soft_cache_length soft_max_length steps_per_generation
    sync_ref_model tau_neg tau_pos teacher_adapters teacher_deepspeed teacher_kl_coef teacher_model
    teacher_model_revision teacher_model_server teacher_model_type teacher_tag_key
    top_entropy_quantile undesirable_weight use_gym_env use_vllm vf_coef vllm_data_parallel_size
    vllm_disable_cascade_attn vllm_disable_custom_all_reduce vllm_enable_expert_parallel
    vllm_enable_lora vllm_enable_prefix_caching vllm_enforce_eager vllm_engine_kwargs
    vllm_gpu_memory_utilization vllm_limit_mm_per_prompt vllm_max_lora_rank vllm_max_model_len
    vllm_max_num_seqs vllm_mm_processor_cache_gb vllm_mode vllm_pipeline_parallel_size
    vllm_quantization vllm_reasoning_parser vllm_server_base_url vllm_server_group_port
    vllm_server_host vllm_server_pass_dataset vllm_server_port vllm_server_timeout
    vllm_speculative_config vllm_tensor_parallel_size vllm_use_async_engine wandb_log_unique_prompts
    whiten_rewards
""".split())

# 3.x ran on transformers 4.x, whose TrainingArguments had options 5.x dropped (warmup_ratio,
# logging_dir, ...): 4.x's list is taken in too, less its 3.x-renamed --tuner_type
SFT_3 = (frozenset("""
    acc_strategy accelerator_config adalora_beta1 adalora_beta2 adalora_deltaT adalora_init_r
    adalora_orth_reg_weight adalora_target_r adalora_tfinal adalora_tinit adam_beta1 adam_beta2
    adam_epsilon adapter_act adapter_length adapters add_non_thinking_prefix add_version
    agent_template aligner_lr attn_impl auto_find_batch_size average_tokens_across_devices
    batch_eval_metrics bf16 bf16_full_eval bnb_4bit_compute_dtype bnb_4bit_quant_storage
    bnb_4bit_quant_type bnb_4bit_use_double_quant boft_block_num boft_block_size boft_dropout
    boft_n_butterfly_factor cached_dataset cached_val_dataset check_model ckpt_dir columns
    create_checkpoint_symlink custom_dataset_info custom_register_path data_seed
    dataloader_drop_last dataloader_in_order dataloader_multiprocessing_context
    dataloader_num_workers dataloader_persistent_workers dataloader_pin_memory
    dataloader_prefetch_factor dataset dataset_num_proc dataset_shuffle ddp_backend
    ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout
    debug deepspeed deepspeed_autotp_size device_groups device_map disable_tqdm do_eval do_predict
    do_train download_mode ds3_gather_for_generation early_stop_interval enable_channel_loss
    enable_dft_loss enable_jit_checkpoint enable_thinking eval_accumulation_steps eval_dataset
    eval_dataset_args eval_delay eval_do_concat_batches eval_generation_config eval_limit
    eval_on_start eval_steps eval_strategy eval_use_evalscope eval_use_gather_object
    external_plugins extra_eval_args fourier_n_frequency fourier_scaling fp16 fp16_full_eval
    freeze_aligner freeze_llm freeze_parameters freeze_parameters_ratio freeze_parameters_regex
    freeze_vit fsdp fsdp_config full_determinism galore_cos_threshold galore_gamma_proj
    galore_optim_per_parameter galore_proj_bits galore_proj_group_size galore_proj_quant
    galore_proj_type galore_quantization galore_queue_size galore_rank galore_scale
    galore_target_modules galore_update_proj_gap galore_with_embedding generation_config
    generation_max_length generation_num_beams gradient_accumulation_steps gradient_checkpointing
    gradient_checkpointing_kwargs greater_is_better help hqq_axis hub_always_push hub_model_id
    hub_private_repo hub_revision hub_strategy hub_token ignore_args_error ignore_data_skip
    include_for_metrics include_num_input_tokens_seen init_strategy init_weights interleave_prob
    label_names label_smoothing_factor lazy_tokenize learning_rate length_column_name
    liger_kernel_config lisa_activated_layers lisa_step_interval llamapro_num_groups
    llamapro_num_new_blocks load_args load_best_model_at_end load_data_args load_from_cache_file
    local_rank local_repo_path log_level log_level_replica log_on_each_node logging_first_step
    logging_nan_inf_filter logging_steps logging_strategy logprobs lora_alpha lora_bias lora_dropout
    lora_dtype lora_ga_batch_size lora_ga_direction lora_ga_iters lora_ga_max_length lora_ga_scale
    lora_ga_stable_gamma lora_modules lora_rank lorap_lr_ratio loss_scale loss_type
    lr_scheduler_kwargs lr_scheduler_type max_epochs max_grad_norm max_length max_memory
    max_model_len max_new_tokens max_pixels max_steps metric metric_for_best_model model
    model_author model_kwargs model_name model_revision model_type modules_to_save
    neftune_noise_alpha new_special_tokens no_add_non_thinking_prefix no_add_version
    no_average_tokens_across_devices no_bnb_4bit_use_double_quant no_check_model
    no_dataloader_in_order no_dataloader_pin_memory no_dataset_shuffle no_ds3_gather_for_generation
    no_eval_do_concat_batches no_freeze_aligner no_freeze_vit no_gradient_checkpointing
    no_log_on_each_node no_logging_first_step no_logging_nan_inf_filter no_remove_unused_columns
    no_skip_memory_metrics no_train_dataloader_shuffle norm_bbox num_beams num_labels
    num_train_epochs optim optim_args optim_target_modules optimizer output_dir packing
    packing_length packing_num_proc padding_free padding_side parallelism_config
    per_device_eval_batch_size per_device_train_batch_size predict_with_generate
    prediction_loss_only problem_type project push_to_hub quant_bits quant_method ray_exp_name
    reft_args reft_intervention_type reft_layer_key reft_layers reft_rank remove_unused_columns
    repetition_penalty report_to response_prefix restore_callback_states_from_checkpoint
    resume_from_checkpoint resume_only_model rope_scaling router_aux_loss_coef run_name
    save_on_each_node save_only_model save_steps save_strategy save_total_limit seed
    sequence_parallel_size shuffle_buffer_size skip_memory_metrics sortish_sampler
    split_dataset_ratio stop_words stopping_strategy stream streaming strict
    structured_outputs_regex swanlab_email_language swanlab_exp_name swanlab_mode
    swanlab_notification_method swanlab_project swanlab_receiver_email swanlab_secret
    swanlab_sender_email swanlab_smtp_port swanlab_smtp_server swanlab_token swanlab_webhook_url
    swanlab_workspace system target_modules target_parameters target_regex task_type temperature
    template template_backend tf32 top_k top_logprobs top_p torch_compile torch_compile_backend
    torch_compile_mode torch_dtype torch_empty_cache_steps trackio_bucket_id trackio_space_id
    trackio_static_space_id train_dataloader_shuffle train_sampling_strategy train_type
    trainable_parameters trainable_parameters_regex truncation_strategy tuner_backend use_cache
    use_chat_template use_cpu use_dora use_flash_ckpt use_galore use_hf use_liger_kernel
    use_logits_to_keep use_ray use_rslora use_swift_lora val_dataset val_dataset_shuffle
    vera_d_initial vera_dropout vera_projection_prng_key vera_rank vit_gradient_checkpointing vit_lr
    warmup_steps weight_decay zero_hpz_partition_size
""".split()) | SFT_4) - {"tuner_type"}

RLHF_3 = SFT_3 | RLHF_4 - {"tuner_type"} | frozenset("""
    advantage_estimator async_generate beta center_rewards_coefficient chord_enable_phi_function
    chord_mu_decay_steps chord_mu_peak chord_mu_valley chord_mu_warmup_steps chord_sft_dataset
    chord_sft_per_device_train_batch_size cliprange cliprange_value completion_length_limit_scope
    cosine_max_len cosine_max_len_value_correct cosine_max_len_value_wrong
    cosine_min_len_value_correct cosine_min_len_value_wrong cpo_alpha delta desirable_weight
    discopop_tau dynamic_sample enable_flattened_weight_sync epsilon epsilon_high gamma
    generation_batch_size importance_sampling_level kl_coef kl_in_reward label_smoothing lam
    ld_alpha lmbda local_rollout_forward_batch_size log_completions log_entropy
    log_rollout_offpolicy_metrics loss_weights max_completion_length max_resample_times max_turns
    missing_eos_penalty move_model_batches multi_turn_scheduler no_enable_flattened_weight_sync
    no_vllm_disable_custom_all_reduce no_vllm_enable_prefix_caching num_generations
    num_generations_eval num_iterations num_mini_batches num_ppo_epochs num_sample_generations
    off_policy_sequence_mask_delta offload_model offload_optimizer offload_teacher_model
    overlong_filter ref_adapters ref_model ref_model_mixup_alpha ref_model_revision
    ref_model_sync_steps ref_model_type repetition_max_penalty repetition_n_grams response_length
    reward_adapters reward_funcs reward_model reward_model_plugin reward_model_revision
    reward_model_type reward_weights rlhf_type rollout_importance_sampling_mode
    rollout_importance_sampling_threshold rpo_alpha scale_rewards seq_kd sft_alpha simpo_gamma
    sleep_level soft_cache_length soft_max_length steps_per_generation sync_ref_model tau_neg
    tau_pos teacher_adapters teacher_deepspeed teacher_model teacher_model_revision
    teacher_model_type top_entropy_quantile undesirable_weight use_vllm vf_coef
    vllm_data_parallel_size vllm_disable_cascade_attn vllm_disable_custom_all_reduce
    vllm_enable_expert_parallel vllm_enable_lora vllm_enable_prefix_caching vllm_enforce_eager
    vllm_engine_kwargs vllm_gpu_memory_utilization vllm_limit_mm_per_prompt vllm_max_lora_rank
    vllm_max_model_len vllm_max_num_seqs vllm_mm_processor_cache_gb vllm_mode
    vllm_pipeline_parallel_size vllm_quantization vllm_reasoning_parser vllm_server_base_url
    vllm_server_group_port vllm_server_host vllm_server_pass_dataset vllm_server_port
    vllm_server_timeout vllm_speculative_config vllm_tensor_parallel_size vllm_use_async_engine
    wandb_log_unique_prompts whiten_rewards
""".split())

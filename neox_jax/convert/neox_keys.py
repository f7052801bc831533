"""Every GPT-NeoX setting, and what neox-jax does with it: honoured, refused, or ignored for a stated reason.

    READ     honoured: neox_yaml.py turns it into a neox-jax setting
    ONLY     neox-jax implements one value of it: any other (or a GPT-NeoX default that differs) is refused
    OFF      a feature neox-jax does not have: refused when set to anything but its off value
    IGNORED  no effect on what is computed here, with the reason (kernel choices XLA makes, launching, logging)

A key in none of them is unknown: a warning names the nearest known key (a typo trains with the default). The
keys are GPT-NeoX's NeoXArgs and its DeepSpeed settings (GPT-NeoX main, 2025); where a default changed in
GPT-NeoX's history, the table takes the one of v2, which trained Pythia and the 20B (`V2_DEFAULTS`: dropout 0.1,
weight decay 0.01; v3 made them 0 and 0.1, as GPT-NeoX main at ea7aefd8 has them), and a file that leaves such a
key unset is told which default it gets (ChangedDefaultWarning).
"""

from __future__ import annotations

import difflib
from typing import Any

READ = {
    # model
    "num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "expansion_factor", "mlp_multiple_of",
    "seq_length", "max_position_embeddings", "layernorm_epsilon", "rotary_pct", "rotary_emb_base", "gpt_j_residual",
    "bias_gelu_fusion", "init_method", "output_layer_init_method", "init_method_std", "make_vocab_size_divisible_by",
    "padded_vocab_size", "attention_config", "num_kv_heads", "precision", "fp16", "bf16", "checkpoint_activations",
    "tokenizer_type", "vocab_file", "hidden_dropout", "attention_dropout", "sequence_parallel",
    # layout and batch
    "model_parallel_size", "pipe_parallel_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gas", "train_batch_size", "zero_optimization",
    # optimizer and schedule
    "optimizer", "optimizer_type", "lr", "min_lr", "warmup", "lr_decay_style", "lr_decay_iters", "lr_decay_fraction",
    "weight_decay", "gradient_clipping", "clip_grad", "train_iters", "seed",
    # data, evaluation, checkpoints, logging
    "data_path", "train_data_paths", "valid_data_paths", "train_data_weights", "valid_data_weights", "split",
    "train_label_data_paths", "valid_label_data_paths", "eval_interval", "eval_iters", "save", "load", "finetune",
    "checkpoint_factor", "save_interval", "keep_last_n_checkpoints", "extra_save_iters", "log_interval",
    "eod_mask_loss", "tensorboard_dir", "peak_theoretical_tflops", "profile", "profile_step_start", "profile_step_stop",
    # DPO (train_impl: dpo, dataset_impl: pairwise)
    "dpo_beta", "dpo_reference_free", "pos_train_data_paths", "neg_train_data_paths", "pos_train_label_data_paths",
    "neg_train_label_data_paths", "pos_valid_data_paths", "neg_valid_data_paths", "pos_valid_label_data_paths",
    "neg_valid_label_data_paths",
    # reward models (train_impl: rm, pairs as DPO's)
    "z_loss",
    # KTO (train_impl: kto)
    "kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "train_reward_data_paths", "valid_reward_data_paths",
}

# key -> (GPT-NeoX's default, the one value neox-jax implements)
ONLY = {
    "norm": ("layernorm", "layernorm"),
    "pos_emb": ("learned", "rotary"),
    "no_weight_tying": (False, True),
    "gpt_j_tied": (False, False),
    "activation": ("gelu", "gelu"),
    "mlp_type": ("regular", "regular"),
    "moe_num_experts": (1, 1),
    "use_bias_in_attn_linear": (True, True),
    "use_bias_in_mlp": (True, True),
    "use_bias_in_norms": (True, True),
    "output_layer_parallelism": ("column", "column"),
    "data_impl": ("infer", ("infer", "mmap")),
    "pack_impl": ("packed", ("packed", "unpacked", "pack_until_overflow")),  # DPO, KTO, RM: "unpacked" (check())
    "allow_chopped": (True, True),  # unpacked documents longer than a sample are cut, never skipped
    "dataset_impl": ("gpt2", "gpt2"),  # DPO: "pairwise"
    "train_impl": ("normal", ("normal", "dpo", "kto", "rm")),
    "checkpoint_scale": ("linear", "linear"),
}
LLAMA = {"norm": ("rmsnorm",), "mlp_type": ("llama",), "activation": ("silu", "swiglu")}  # two of them: a Llama
# key -> (v2's default, which the table takes; v3's and GPT-NeoX main's)
V2_DEFAULTS = {"hidden_dropout": (0.1, 0.0), "attention_dropout": (0.1, 0.0), "weight_decay": (0.01, 0.1)}


def _each(reason: str, *keys: str) -> dict[str, str]:
    return {k: reason for k in keys}


# key -> why it is refused when set (to True, a non-empty value, or a number other than 0). The model's own are
# refused for weights-only reads too; the training ones only for training.
OFF_MODEL = {
    **_each("sparse or sliding-window attention is not implemented (dense causal only)", "sparsity_config",
           "sliding_window_width", "sparse_attention"),
    **_each("not implemented in neox-jax's model", "use_qk_layernorm", "num_unique_layers", "soft_prompt_tuning",
           "use_mup", "te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_mha"),
}
OFF_TRAINING = {
    **_each("neox-jax trains with train_iters", "train_epochs"),
    **_each("weights from document counts are not implemented: give data weights", "weight_by_num_documents"),
    **_each("the reference log-probabilities are computed on the fly from the reference weights kept in the train "
            "state, not read from precomputed files", "precompute_model_name"),
    **_each("neox-jax's optimizer is AdamW with GPT-NeoX's schedule", "use_bnb_optimizer", "scheduler",
           "use_checkpoint_lr_scheduler"),
    **_each("a run resumes its whole state from `save`, or starts from `load`'s weights with `finetune: true`",
           "no_load_optim", "no_load_rng"),
    **_each("not implemented: stop with train_iters, or SIGTERM (the step is saved)", "exit_interval"),
    **_each("not implemented: copy the checkpoints from `save` yourself", "s3_path"),
    **_each("not a DeepSpeed feature neox-jax has", "amp", "curriculum_learning", "data_efficiency", "elasticity",
           "compression_training", "autotuning", "deepspeed_extra_args", "serve_model_weights"),
}
OFF = {**OFF_MODEL, **OFF_TRAINING}


IGNORED = {
    **_each("a fused CUDA kernel of GPT-NeoX's; XLA fuses on its own (the function is the same)",
               "layernorm_fusion", "rmsnorm_fusion", "scaled_upper_triang_masked_softmax_fusion",
               "scaled_masked_softmax_fusion", "bias_dropout_fusion", "rope_fusion", "fused_kernels_build_path",
               "use_flashattn_swiglu", "mamba_selective_scan_fusion", "mamba_causal_conv_fusion",
               "mamba_inner_func_fusion"),
    **_each("neox-jax's softmax and loss are always fp32, which these only approximate", "attention_softmax_in_fp32",
               "apply_query_key_layer_scaling", "fp16_lm_cross_entropy"),
    **_each("only for a feature that is refused or off here (it is checked through that feature)",
               "rms_norm_epsilon", "scalenorm_epsilon", "rpe_num_buckets", "rpe_max_distance", "opt_pos_emb_offset",
               "param_sharing_style", "gmlp_attn_dim", "mamba_selective_fp32_params", "mamba_use_bias_in_conv",
               "mamba_use_bias_in_linears", "moe_expert_interval", "moe_top_k", "moe_router_type", "moe_lbl_in_fp32",
               "moe_jitter_eps", "te_fp8_format", "te_fp8_wgrad", "te_fp8_amax_history_len",
               "te_fp8_amax_compute_algo", "te_fp8_margin", "dim_att", "head_size", "ffn_dim", "weight_server_port",
               "online_dataserver_ips", "online_dataserver_ports", "mup_init_scale", "mup_attn_temp",
               "mup_output_temp", "mup_embedding_mult", "mup_rp_embedding_mult", "mup_width_scale", "coord_check",
               "save_base_shapes", "base_shapes_file", "fp32_reinforce", "kl_impl",
               "kl_div_beta", "reinforce_leave_one_out", "weighted_sampler_alpha",
               "s3_chunk_size", "curriculum_seqlen"),
    **_each("neox-jax's log-probabilities are always computed in fp32", "dpo_fp32", "kto_fp32"),
    **_each("no test evaluation is run (pairs for testing)", "pos_test_data_paths", "neg_test_data_paths",
            "pos_test_label_data_paths", "neg_test_label_data_paths"),
    **_each("where memory is kept and how layers are placed: XLA and the rules table decide (the function is the "
               "same); remat is per layer", "checkpoint_num_layers", "partition_activations",
               "contiguous_checkpointing", "checkpoint_in_cpu", "synchronize_each_layer", "profile_backward",
               "deepspeed_activation_checkpointing", "activation_checkpointing", "pipe_partition_method",
               "use_cpu_initialization", "zero_stage", "zero_reduce_scatter", "zero_contiguous_gradients",
               "zero_reduce_bucket_size", "zero_allgather_bucket_size", "fp32_allreduce", "prescale_gradients",
               "gradient_predivide_factor", "communication_data_type", "sparse_gradients", "data_types",
               "rotary_save_freqs_buffer", "mmap_warmup", "num_workers", "use_shared_fs", "checkpoint"),
    **_each("how GPT-NeoX launches: use `neox-jax launch`, SLURM or Open MPI (docs/multihost.md)",
               "distributed_backend", "local_rank", "rank", "lazy_mpu_init", "world_size", "is_pipe_parallel",
               "global_num_gpus", "deepspeed", "deepspeed_mpi", "deepspeed_slurm", "deepscale", "deepscale_config",
               "user_script", "launcher", "hostfile", "include", "exclude", "num_nodes", "num_gpus", "master_port",
               "master_addr", "force_multi", "no_ssh_check", "comment", "account", "autotuning_run", "onnx_safe",
               "adlr_autoresume", "adlr_autoresume_interval", "config_files", "iteration", "do_train", "do_valid",
               "do_test", "git_hash"),
    **_each("GPT-NeoX's logging and profiling knobs: neox-jax logs loss, lr, gradient norm, throughput and MFU "
               "to the console and TensorBoard (`wandb_project` for wandb)", "steps_per_print",
               "wall_clock_breakdown", "dump_state", "flops_profiler", "comms_logger", "memory_profiling",
               "memory_profiling_path", "log_grad_pct_zeros",
               "log_param_norm", "log_grad_norm", "log_optimizer_states", "log_gradient_noise_scale",
               "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload", "log_dir", "use_wandb",
               "wandb_group", "wandb_run_name", "wandb_team", "wandb_project", "wandb_host", "wandb_init_all_ranks",
               "use_comet", "comet_workspace", "comet_project", "comet_experiment_name", "comet_tags",
               "comet_others", "comet_experiment", "tensorboard", "wandb", "csv_monitor", "char_level_ppl"),
    **_each("GPT-NeoX's generation and evaluation scripts: use `neox-jax generate` / `neox-jax lm-eval`",
               "text_gen_type", "temperature", "top_p", "top_k", "return_logits", "maximum_tokens", "prompt_end",
               "sample_input_file", "sample_output_file", "num_samples", "recompute", "eval_results_prefix",
               "eval_tasks"),
    **_each("neox-jax runs no test evaluation at the end of training", "test_data_paths", "test_data_weights",
           "test_label_data_paths", "test_reward_data_paths"),
    **_each("the data are tokenized already (`tokenizer` names a tokenizer.json for samples)", "merge_file"),
    **_each("neox-jax always saves and restores the whole state, which exact resume needs", "no_save_optim",
               "no_save_rng", "override_lr_scheduler"),
    **_each("unused by GPT-NeoX's GPT2Dataset", "short_seq_prob"),
    **_each("set by GPT-NeoX at run time (a checkpoint's stored config carries it)", "tokenizer",
               "tensorboard_writer", "save_iters", "batch_size"),
    **_each("every checkpoint is verified by its fingerprints and probe on restore",
               "checkpoint_validation_with_forward_pass"),
    **_each("loss scaling for fp16 only (its settings are read from `fp16`)", "hysteresis", "dynamic_loss_scale",
               "loss_scale", "loss_scale_window", "min_scale"),
}

KNOWN = READ | set(ONLY) | set(OFF) | set(IGNORED)
assert not (READ & set(ONLY)) and not (READ & set(OFF)) and not (READ & set(IGNORED)) and not (set(OFF) & set(IGNORED))


def _is_on(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, "none", "None") and not (isinstance(value, dict)
                                                                              and value.get("enabled") is False)


def check(args: dict[str, Any], where: str, weights_only: bool = False) -> list[str]:
    """Refuse (all at once) the settings neox-jax does not implement; return a warning for each unknown key."""
    refused = []
    pairwise = {**ONLY, "pack_impl": ("packed", "unpacked"), "dataset_impl": ("gpt2", "pairwise")}
    only = {"dpo": pairwise, "rm": pairwise, "kto": {**ONLY, "pack_impl": ("packed", "unpacked")}}.get(
        args.get("train_impl"), ONLY)  # one document per sample
    for key, (default, needed) in only.items():
        value = args.get(key, default)
        if value not in (needed if isinstance(needed, tuple) else (needed,)):
            implemented = " or ".join(map(repr, needed)) if isinstance(needed, tuple) else repr(needed)
            refused.append(f"{key}={value!r}" + (" (GPT-NeoX's default)" if key not in args else "")
                           + f" is not supported: neox-jax implements {key}: {implemented} only")
    refused += [f"{key}={args[key]!r}: {reason}" for key, reason in (OFF_MODEL if weights_only else OFF).items()
                if key in args and _is_on(args[key])]
    llama = [f"{k}: {args[k]}" for k, values in LLAMA.items() if args.get(k) in values]
    if len(llama) >= 2:  # GPT-NeoX's own post-training examples are Llama models: say so first
        refused.insert(0, f"a Llama model ({', '.join(llama)}), not a GPT-NeoX one: neox-jax trains the GPT-NeoX "
                          "architecture (Pythia, GPT-NeoX-20B) only")
    if refused:
        from neox_jax.errors import ConfigError

        raise ConfigError(f"{where}: " + ("\n  ".join([""] + refused) if len(refused) > 1 else refused[0]))
    warnings = []
    for key in args:
        if key not in KNOWN:
            near = difflib.get_close_matches(key, sorted(KNOWN), n=1, cutoff=0.7)
            warnings.append(f"{where}: unknown GPT-NeoX setting {key!r} ignored"
                            + (f"; did you mean {near[0]!r}?" if near else ""))
    return warnings

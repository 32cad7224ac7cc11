"""The tests deselected from the README's test command and run by `.ci/run` with `-m slow`:
trained-model compiles, zoo sweeps, fresh-process reloads at scale, long property runs.

Entries are node ids relative to tests/ (a file, a test with all its parameters, or one
parameter); tests/conftest.py marks them ``slow``. The seconds are wall times measured on the
2-core development machine under load (about 10) on 2026-12-07, from pytest's ``--durations``.
"""

SLOW = (
    # fresh-process reloads at scale and whole-set exports of the acceptance models
    "api/test_prune_transformers.py::test_normalised_widths_deploy",  # 146 s (5 of 7 models listed)
    "api/test_prune_transformers.py::test_compact_models_reload_from_pt2_in_a_fresh_process",  # 43 s
    "api/test_prune_transformers.py::test_deployed_files_keep_the_declared_sequence_length_dynamic",  # 28 s
    "api/test_prune_transformers.py::test_compact_model_exports_to_onnx[T5ForConditionalGeneration]",  # 17 s
    "api/test_prune_transformers.py::test_compact_model_exports_to_onnx[Qwen2ForCausalLM]",  # 15 s
    "api/test_prune_transformers.py::test_compact_model_exports_to_onnx[LlamaForCausalLM]",  # 8 s
    "api/test_prune_transformers.py::test_compact_model_exports_to_onnx[GPT2LMHeadModel]",  # 5 s
    # 19 s
    "api/test_prune_transformers.py::test_normalised_widths_prune_exactly_and_train[T5ForConditionalGeneration]",
    "api/test_prune_models.py::test_compact_models_reload_from_pt2_in_a_fresh_process",  # 35 s
    # the acceptance transformers: T5 (the slowest), and DistilBERT and Qwen2, near twins of BERT and
    # Llama, which stay (seconds of the fast run under coverage, load 5)
    "api/test_prune_transformers.py::test_prunes_heads_and_mlp_widths_exactly[T5ForConditionalGeneration]",  # 47 s
    "api/test_prune_transformers.py::test_compact_model_trains[T5ForConditionalGeneration]",
    "api/test_prune_transformers.py::test_prunes_heads_and_mlp_widths_exactly[Qwen2ForCausalLM]",  # 12 s
    "api/test_prune_transformers.py::test_compact_model_trains[Qwen2ForCausalLM]",
    "api/test_prune_transformers.py::test_normalised_widths_prune_exactly_and_train[Qwen2ForCausalLM]",  # 13 s
    "api/test_prune_transformers.py::test_prunes_heads_and_mlp_widths_exactly[DistilBertModel]",  # 10 s
    "api/test_prune_transformers.py::test_compact_model_trains[DistilBertModel]",
    "api/test_prune_transformers.py::test_compact_model_exports_to_onnx[DistilBertModel]",  # 18 s
    "api/test_prune_transformers.py::test_normalised_widths_prune_exactly_and_train[DistilBertModel]",  # 11 s
    "api/test_normalised_widths.py::test_torchvision_transformers_prune_exactly[swin]",  # 19 s (convnext stays)
    # zoo sweep: the heaviest acceptance models (each pruned once, by its first test)
    "api/test_prune_models.py::test_prunes_exactly_at_two_batch_sizes[raft_small]",  # 8 s
    "api/test_prune_models.py::test_compact_model_trains[raft_small]",
    "api/test_prune_models.py::test_compact_model_exports_to_onnx[raft_small]",  # 11 s
    "api/test_prune_models.py::test_prunes_exactly_at_two_batch_sizes[ssdlite320_mobilenet_v3_large]",  # 9 s
    "api/test_prune_models.py::test_compact_model_trains[ssdlite320_mobilenet_v3_large]",
    "api/test_prune_models.py::test_compact_model_exports_to_onnx[ssdlite320_mobilenet_v3_large]",
    "api/test_prune_models.py::test_prunes_exactly_at_two_batch_sizes[retinanet_resnet50_fpn]",  # 5 s
    "api/test_prune_models.py::test_compact_model_trains[retinanet_resnet50_fpn]",
    "api/test_prune_models.py::test_compact_model_exports_to_onnx[retinanet_resnet50_fpn]",
    # fresh processes
    "api/test_checkpoint.py::test_killed_run_resumes_from_its_last_checkpoint",  # 21 s
    "cli/test_cli.py::test_console_script_prunes",  # 17 s
    "passes/sparsity/test_resume_process.py",  # 407 s (iee 177, feather 143, dst_ee 87)
    "passes/sparsity/test_ddp.py",  # 14-49 s: two ranks in two processes
    # the wheel: build, install, import every module in a fresh process
    "test_wheel.py",  # 36 s
    # profiling and budgets timed on real ONNX Runtime sessions (the quick profile tests stay)
    "runtime/test_profile.py::test_profile_under_a_busy_loop_predicts_what_it_measures",  # 55 s
    "runtime/test_profile.py::test_transposed_convolutions_are_profiled_at_their_pruned_widths",  # 30 s
    "runtime/test_profile.py::test_concurrent_writers_of_one_cache_file_lose_no_point",  # 21 s
    "runtime/test_profile.py::test_a_killed_profile_keeps_every_point_it_measured",  # 21 s
    "runtime/test_profile.py::test_the_reference_layer_cancels_a_change_of_machine_speed_between_chunks",  # 20 s
    "runtime/test_budget.py::test_flops_can_steer_when_no_table_was_profiled",  # 16 s
    "passes/sparsity/methods/test_halp.py::test_halp_meets_a_latency_budget_on_a_real_onnxruntime_table",  # 34 s
    "passes/sparsity/test_knapsack.py::test_latency_selection_on_a_real_onnxruntime_table",  # 21 s
    # trained-model compiles (one shortened compile of the embedded default stays: compiler/test_pipeline.py)
    "compiler/test_trained.py::test_the_measured_budget_is_hit",
    "compiler/test_trained.py::test_the_budget_check_fails_when_the_budget_is_ignored",
    "compiler/test_trained.py::test_the_report_states_fidelity_per_output_and_the_loss_used",
    "compiler/test_trained.py::test_distillation_brings_the_maps_closer_to_dense_than_the_selection_it_started_from",
    "compiler/test_trained.py::test_the_artifact_computes_the_compiled_model",
    "compiler/test_trained.py::test_an_unreachable_budget_stops_before_profiling",
    "compiler/test_trained.py::test_one_shot_2_4_keeps_the_largest_weights_of_the_trained_model",
    "compiler/test_trained.py::test_the_users_loss_and_metric_on_labeled_loaders",
    "compiler/test_channel_methods.py::test_the_named_method_runs_mask_updates_during_recovery",
    "compiler/test_channel_methods.py::test_the_measured_budget_holds_after_the_methods_last_selection",
    "compiler/test_channel_methods.py::test_the_artifact_is_the_sparse_models_compact_model",
    "compiler/test_channel_methods.py::test_without_updates_the_count_is_zero_and_the_final_check_re_aims",
    "compiler/test_channel_methods.py::test_a_final_check_that_ignores_the_budget_is_caught",
    "compiler/test_channel_methods.py::test_a_final_selection_that_cannot_reach_the_budget_fails_clearly",
    "examples/test_craft.py::test_one_shot_2_4_on_torch_gives_exact_magnitude_2_4_weights",
    "cli/test_output_files.py::test_every_file_a_real_run_leaves_was_written_through_the_files_module",
    "cli/test_user_errors.py::test_no_traceback_for_user_errors_in_a_real_process",
    "cli/test_cli_fuzz.py::test_no_traceback_reaches_a_real_terminal",  # 47 s, four fresh processes
    # a full disk at three limits in fresh processes: 3000 bytes stays
    "cli/test_output_files.py::test_prune_on_a_disk_that_fills_up_exits_2_with_one_line_and_leaves_nothing[0]",  # 10 s
    "cli/test_output_files.py::test_prune_on_a_disk_that_fills_up_exits_2_with_one_line_and_leaves_nothing[20000]",
)

"""MLflow tracking: the only package in rdml that imports mlflow.

Runs are addressed by explicit id through ``MlflowClient`` (no active-run globals), so the same calls
work on the driver, in Ray actors and in Tune trials, for parent and child runs alike.

Usage on the driver::

    run_id = start_run(cfg)                      # TrackingError if the store does not answer
    logger = RunLogger(run_id, cfg.tracking)     # a training Callback; picklable
    try:
        result = fit(cfg, callbacks=[logger])
    except BaseException:
        end_run(run_id, "FAILED"); raise
    end_run(run_id)
"""

from rdml.tracking.logger import (
    NullLogger,
    RunLogger,
    log_checkpoint_model,
    log_embedding_plot,
    log_training_plots,
    make_logger,
)
from rdml.tracking.modelfiles import model_spec, quiet_rebuilds, read_model_dir, write_model_dir
from rdml.tracking.runs import (
    child_runs,
    download_artifact,
    end_run,
    end_run_if_running,
    experiment_run_ids,
    flatten,
    list_artifacts,
    load_logged_model,
    log_artifact,
    log_dict,
    log_figure,
    log_files,
    log_metrics,
    log_model,
    log_params,
    log_text,
    logged_models,
    metric_key,
    remember,
    resume_run,
    run_status,
    set_tags,
    start_run,
    uri_of,
)
from rdml.tracking.store import artifact_root, check_reachable, ensure_experiment, resolve_uri, resolved_uri

__all__ = [
    "NullLogger", "RunLogger", "artifact_root", "check_reachable", "child_runs", "download_artifact", "end_run",
    "end_run_if_running", "ensure_experiment", "experiment_run_ids", "flatten", "list_artifacts", "load_logged_model", "log_artifact",
    "log_checkpoint_model", "log_dict", "log_embedding_plot", "log_figure", "log_files", "log_metrics", "log_model",
    "log_params", "log_text", "log_training_plots", "logged_models", "make_logger", "metric_key", "model_spec",
    "quiet_rebuilds", "read_model_dir", "remember", "resolve_uri", "resolved_uri", "resume_run", "run_status",
    "set_tags", "start_run", "uri_of", "write_model_dir",
]

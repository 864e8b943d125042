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
from rdml.tracking.runs import (
    child_runs,
    download_artifact,
    end_run,
    end_run_if_running,
    flatten,
    list_artifacts,
    load_logged_model,
    log_artifact,
    log_dict,
    log_figure,
    log_metrics,
    log_model,
    log_params,
    log_text,
    metric_key,
    remember,
    run_status,
    set_tags,
    start_run,
    uri_of,
)
from rdml.tracking.store import artifact_root, check_reachable, ensure_experiment, resolve_uri, resolved_uri

__all__ = [
    "NullLogger", "RunLogger", "artifact_root", "check_reachable", "child_runs", "download_artifact", "end_run",
    "end_run_if_running", "ensure_experiment", "flatten", "list_artifacts", "load_logged_model", "log_artifact",
    "log_checkpoint_model", "log_dict", "log_embedding_plot", "log_figure", "log_metrics", "log_model",
    "log_params", "log_text", "log_training_plots", "make_logger", "metric_key", "remember", "resolve_uri",
    "resolved_uri", "run_status", "set_tags", "start_run", "uri_of",
]

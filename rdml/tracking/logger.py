"""The training callback that writes a run: :class:`RunLogger` (and :class:`NullLogger`).

One logger per run, one writer: metrics are buffered and sent with ``log_batch`` at each epoch end
(over HTTP a single ``log_metric`` costs ~50 ms; a batch costs the same for a thousand values). The
logger holds only strings and lists, and creates its MlflowClient lazily, so it pickles into a Ray
worker or Tune trial and logs from there.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdml.tracking import runs
from rdml.tracking.store import resolved_uri

if TYPE_CHECKING:
    from rdml.config import ExperimentConfig, TrackingConfig


class NullLogger:
    """The callback used when tracking is disabled: every hook does nothing."""

    run_id = None

    def on_train_start(self, cfg: Any) -> None: ...
    def on_step(self, step: int, stats: dict[str, float]) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: Any) -> None: ...
    def on_train_end(self, result: Any) -> None: ...
    def flush(self) -> None: ...


class RunLogger:
    """Training :class:`~rdml.train.Callback` logging to the MLflow run ``run_id``.

    * ``on_step``: every ``log_every_steps`` steps, the step stats (``step/<key>``, step = global step;
      the per-epoch means are the ``train/<key>`` metrics of ``on_epoch_end``),
      buffered;
    * ``on_epoch_end``: the epoch metrics (step = epoch) plus the buffer, in one batch;
    * ``on_checkpoint``: remembers the newest checkpoint;
    * ``on_train_end``: flushes, uploads the final checkpoint, the loss and R@1/NMI curves and (with
      ``final_artifacts``) the logged model and the PCA picture of the test embedding.

    It does not end the run: whoever called :func:`~rdml.tracking.start_run` ends it (FINISHED, or
    FAILED/KILLED on an exception), so a crash is recorded as such. Logging errors after the start are
    warnings: losing a curve point must not kill an hour of training.
    """

    def __init__(
        self,
        run_id: str | None,
        tracking_cfg: TrackingConfig | str | None = None,
        log_every_steps: int = 10,
        final_artifacts: bool = True,
        log_model: bool | None = None,
    ) -> None:
        self.run_id = run_id
        # resolve now (on the driver): a worker's CWD or environment may differ
        self.uri = runs._RUN_URIS.get(run_id) if run_id else None
        if self.uri is None and run_id is not None:
            self.uri = resolved_uri(tracking_cfg)
        enabled = getattr(tracking_cfg, "enabled", True)
        self.active = bool(run_id) and enabled
        self.log_every_steps = max(1, int(log_every_steps))
        self.final_artifacts = final_artifacts
        self.log_model = getattr(tracking_cfg, "log_model", True) if log_model is None else log_model
        self._buffer: list[Any] = []
        self._history: list[dict[str, Any]] = []
        self._checkpoint: str | None = None
        self._warned = False

    # -- Callback protocol -------------------------------------------------------------------------
    def on_train_start(self, cfg: ExperimentConfig) -> None:
        """Nothing to record: the run's own status (RUNNING until ended) says that training is on.

        (An ``rdml.status: training`` tag used to be set here and was never cleared.)
        """

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        if self.active and step % self.log_every_steps == 0:
            self._buffer.extend(runs.metric_entities({f"step/{k}": v for k, v in stats.items()}, step))

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._history.append({"epoch": epoch, **metrics})
        if not self.active:
            return
        self._buffer.extend(runs.metric_entities(metrics, epoch))
        self.flush()

    def on_checkpoint(self, path: Any) -> None:
        self._checkpoint = str(path)

    def on_train_end(self, result: Any) -> None:
        if not self.active:
            return
        self.flush()
        history = list(getattr(result, "history", None) or self._history)
        checkpoint = getattr(result, "checkpoint", None) or self._checkpoint
        final = getattr(result, "metrics", None) or {}
        if final:
            self._safe(runs.log_metrics, self.run_id, {f"final/{k}": v for k, v in final.items()},
                       step=len(history), tracking=self.uri)
        if history:
            self._safe(log_training_plots, self.run_id, history, tracking=self.uri)
        if checkpoint and Path(checkpoint).exists():
            self._safe(runs.log_artifact, self.run_id, checkpoint, "checkpoints", tracking=self.uri)
            if self.final_artifacts:
                self._safe(log_checkpoint_model, self.run_id, checkpoint, tracking=self.uri,
                           log_model=self.log_model)

    # -- helpers ----------------------------------------------------------------------------------
    def flush(self) -> None:
        if not self.active or not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._safe(runs.log_metric_entities, self.run_id, batch, tracking=self.uri)

    def _safe(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a lost log line must not stop training
            warnings.warn(f"MLflow logging to {self.uri} failed ({type(exc).__name__}: {exc}); training goes on",
                          stacklevel=2)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_logger(run_id: str | None, tracking_cfg: TrackingConfig | None = None, **kwargs: Any) -> RunLogger | NullLogger:
    """A :class:`RunLogger`, or a :class:`NullLogger` when tracking is off or there is no run."""
    if run_id is None or (tracking_cfg is not None and not tracking_cfg.enabled):
        return NullLogger()
    return RunLogger(run_id, tracking_cfg, **kwargs)


def log_training_plots(run_id: str | None, history: list[dict[str, Any]], tracking: Any = None) -> None:
    """``plots/loss.png`` and ``plots/recall_nmi.png`` from the per-epoch history."""
    if run_id is None or not history:
        return
    from rdml.tracking.plots import loss_figure, quality_figure

    runs.log_figure(run_id, loss_figure(history), "plots/loss.png", tracking=tracking)
    runs.log_figure(run_id, quality_figure(history), "plots/recall_nmi.png", tracking=tracking)


def log_embedding_plot(run_id: str | None, emb: Any, labels: Any, tracking: Any = None,
                       name: str = "plots/embedding_pca.png") -> None:
    """The 2-D PCA of the test embedding, coloured by class."""
    if run_id is None:
        return
    from rdml.tracking.plots import embedding_figure

    runs.log_figure(run_id, embedding_figure(emb, labels), name, tracking=tracking)


def log_checkpoint_model(run_id: str | None, checkpoint: str | Path, tracking: Any = None, log_model: bool = True,
                         max_points: int = 2000) -> None:
    """Load the final checkpoint; log the model and the PCA picture of its test-set embedding."""
    if run_id is None:
        return
    from rdml.data import SubsetDataset, build_datasets
    from rdml.eval import embed
    from rdml.models import build_model
    from rdml.tracking.modelfiles import model_spec, quiet_rebuilds
    from rdml.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    cfg = ckpt.config
    with quiet_rebuilds():
        model = build_model(cfg.model.model_copy(update={"pretrained": None}), ckpt.in_channels, ckpt.image_size)
    model.load_state_dict(ckpt.model_state)
    model.eval()
    if log_model:
        runs.log_model(run_id, model, name="model", tracking=tracking,
                       spec=model_spec(cfg, ckpt.in_channels, ckpt.image_size))
    test = build_datasets(cfg.data).test
    if len(test) > max_points:
        test = SubsetDataset(test, list(range(max_points)))
    emb, labels = embed(model, test, batch_size=cfg.data.eval_batch_size, device="cpu")
    log_embedding_plot(run_id, emb, labels, tracking=tracking)

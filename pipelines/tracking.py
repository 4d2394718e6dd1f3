"""MLflow helpers shared by every stage (entrypoint side only: `groupvit/` never imports MLflow).

The tracking URI comes from params (`tracking.uri`), else `MLFLOW_TRACKING_URI`, else a sqlite database in the
project (`sqlite:///<project root>/mlflow.db`, artifacts in `<project root>/mlartifacts`). A server that cannot be
reached fails *before* any work with a message naming the URI, instead of after an hour of training.

    cfg = load(TrackingConfig, args, "tracking")
    with start_run(cfg, "evaluate", tags={"git_commit": git_commit()}) as run:
        mlflow.log_metric("miou", 0.5)

`RunTracker` is the train stage's run: resumed with its checkpoints, rank 0 only, registering the trained model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from groupvit.atomic import atomic_write
from groupvit.config import flat_dict, param
from groupvit.errors import ConfigError, DataError

# Set before mlflow is imported anywhere in the process: no network calls from a tracking library.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
log = logging.getLogger("groupvit.train")  # RunTracker's messages belong to the train stage's output


@dataclass(frozen=True)
class TrackingConfig:
    """The `tracking` section of params.yaml."""

    uri: str = param("", help="tracking URI; '' -> $MLFLOW_TRACKING_URI -> sqlite:///<project root>/mlflow.db")
    experiment: str = param("groupvit", help="MLflow experiment name")
    registered_model: str = param("groupvit", help="model registry name of the trained model ('' = do not register)")
    system_metrics: bool = param(True, help="log CPU/GPU/memory system metrics during training")


def resolve_uri(cfg: TrackingConfig, root: str | os.PathLike[str] | None = None) -> str:
    """The tracking URI to use: params, then `MLFLOW_TRACKING_URI`, then the project's sqlite database.

    Args:
        cfg: the tracking config.
        root: project root for the default database (default: the current directory, where DVC runs stages).
    """
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}"


def _local_path(uri: str) -> Path | None:
    """The file a `sqlite:///` or `file:` URI points to (None for servers)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:////") else uri[len("sqlite://"):])
    parsed = urlparse(uri)
    if parsed.scheme in ("file", ""):
        return Path(parsed.path or uri)
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear ConfigError when the tracking store cannot be used.

    http(s): the server must answer `GET /health` (or the experiments API) within `timeout` seconds.
    sqlite/file: the directory that holds the store must exist (or be creatable) and be writable.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        errors = []
        for path in ("/health", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"):
            try:
                with urllib.request.urlopen(uri.rstrip("/") + path, timeout=timeout) as resp:
                    if resp.status < 500:
                        return
                    errors.append(f"{path}: HTTP {resp.status}")
            except urllib.error.HTTPError as e:  # 404 on /health from a proxy still means "something answers"
                if e.code < 500 and path != "/health":
                    return
                errors.append(f"{path}: HTTP {e.code}")
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{path}: {getattr(e, 'reason', e)}")
        raise ConfigError(f"tracking.uri: MLflow tracking server {uri} is not reachable ({'; '.join(errors)}); "
                          "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or set tracking.uri / "
                          "MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// database")
    path = _local_path(uri)
    if path is None:  # databricks, postgres, ...: let MLflow report its own errors
        return
    folder = path.parent if scheme == "sqlite" else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"tracking.uri: cannot create the folder {folder} for {uri} ({e})") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"tracking.uri: folder {folder} of {uri} is not writable")


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local database (`<db folder>/mlartifacts`), the server's default otherwise."""
    path = _local_path(uri)
    if urlparse(uri).scheme != "sqlite" or path is None:
        return None
    return (path.parent / "mlartifacts").resolve().as_uri()


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"  # "machine learning"


def setup(cfg: TrackingConfig, root: str | os.PathLike[str] | None = None) -> str:
    """Check the store, point MLflow at it and create/select the experiment; returns the resolved URI."""
    import mlflow

    uri = resolve_uri(cfg, root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        try:
            mlflow.create_experiment(cfg.experiment, artifact_location=_artifact_location(uri))
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            if mlflow.get_experiment_by_name(cfg.experiment) is None:
                raise
    experiment = mlflow.set_experiment(cfg.experiment)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # without it MLflow 3 may open the experiment on its GenAI traces overview (empty here), not the runs table
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return uri


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str, tags: Mapping[str, str] | None = None, nested: bool = False,
              root: str | os.PathLike[str] | None = None, log_system_metrics: bool | None = None,
              start_time: float | None = None) -> Iterator[Any]:
    """`with start_run(cfg, "train") as run:` an MLflow run in the configured store and experiment.

    The run ends FAILED when the body raises, FINISHED otherwise (MLflow's own context-manager behaviour).
    `start_time` (seconds since the epoch) back-dates the run's start to when its work began, for a stage that logs
    only once its work is done, so the run's duration in the UI is the work's.
    """
    import mlflow

    setup(cfg, root)
    system = cfg.system_metrics if log_system_metrics is None else log_system_metrics
    run_id = None
    if start_time is not None and not nested and mlflow.active_run() is None and "MLFLOW_RUN_ID" not in os.environ:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        run_id = mlflow.MlflowClient().create_run(experiment.experiment_id, start_time=int(start_time * 1000),
                                                  tags=dict(tags or {}), run_name=run_name).info.run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                          tags=None if run_id else dict(tags or {}), log_system_metrics=system) as run:
        yield run


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The current git commit (with `-dirty` when the tree has uncommitted changes); '' outside a repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return ""


def dvc_data_hashes(paths: Iterable[str], lock_file: str | os.PathLike[str] = "dvc.lock") -> dict[str, str]:
    """`{path: md5}` of the given data paths as recorded in dvc.lock (outs of earlier stages); {} without a lock.

    Tag names are `dvc.<path>` in MLflow, so a run says exactly which version of the data it saw.
    """
    lock = Path(lock_file)
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
    except yaml.YAMLError:
        return {}
    wanted = {str(Path(p)).rstrip("/") for p in paths}
    found: dict[str, str] = {}
    for stage in stages.values():
        for entry in (stage.get("outs") or []) + (stage.get("deps") or []):
            path = str(Path(entry.get("path", ""))).rstrip("/")
            digest = entry.get("md5") or ""  # "hash" holds the algorithm name, not the digest
            if path in wanted and digest and path not in found:
                found[path] = str(digest)
    return found


# ---- the record beside trained weights --------------------------------------------------------------------------

MODEL_RECORD = "mlflow.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_model_record(model_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write `<model_dir>/mlflow.json`: the MLflow run (and registered version) of the weights in that folder.

    The record is machine-local (run id, absolute tracking and artifact URIs), so `.dvcignore` keeps it out of the
    folder's DVC hash: two machines that train the same weights write the same dvc.lock, and a shared DVC remote
    never carries one machine's paths. It is bound to `model.safetensors` by the file's SHA-256, because
    `dvc checkout` of other weights leaves an ignored file in place; `read_model_record` then refuses it.
    """
    path = Path(model_dir) / MODEL_RECORD
    text = json.dumps({**record, "safetensors_sha256": _file_sha256(Path(model_dir) / "model.safetensors")},
                      indent=2) + "\n"
    return atomic_write(path, text)


def read_model_record(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record `write_model_record` left for the weights now in `model_dir`; None when there is none.

    Raises:
        DataError: the record is not a JSON object, or it belongs to other weights (e.g. after `dvc checkout`).
    """
    path = Path(model_dir) / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(record).__name__}")
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file() or record.get("safetensors_sha256") != _file_sha256(weights):
        raise DataError(f"{path} describes other weights than {weights} (its safetensors_sha256 does not match the "
                        "file): the folder was checked out or replaced after training; `dvc repro train` (or "
                        "`groupvit train`) writes a record for these weights")
    return record


def register_model(name: str, run_id: str, artifact_path: str = "model") -> str:
    """Register the run's `artifact_path` folder (safetensors + config.json) as a new version of model `name`.

    Uses the registry's low-level API because the folder holds plain files, not an MLflow-flavoured model; the
    version's source is the run's artifact folder, so `models:/<name>/<version>` downloads exactly those files.

    Returns:
        The new version number, as a string.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="GroupViT weights (model.safetensors + config.json)")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    return str(client.create_model_version(name, source=source, run_id=run_id).version)


# ---- the train stage's run -----------------------------------------------------------------------------------------

class RunTracker:
    """Rank 0's MLflow run of `groupvit train`: resolved config as params, git/DVC tags, per-log-step metrics, system
    metrics, the model files and loss curve as artifacts, and a model-registry version. A no-op when not `enabled`
    (the other ranks).

    A resumed training continues the MLflow run of its checkpoints (its id is kept in `<train dir>/mlflow_run.json`).

        tracker = RunTracker(cfg, train_dir, enabled=info.is_main)
        with tracker.run(params, data_paths=(shards, nouns), resume=will_resume(...)):
            fit(..., log_fn=tracker.log_metrics)
            registered = tracker.finish(model_dir, metrics, curve_csv)
    """

    def __init__(self, cfg: TrackingConfig, train_dir: Path, enabled: bool, run_name: str = "train/groupvit"):
        self.cfg, self.enabled, self.run_name = cfg, enabled, run_name
        self.run_file = Path(train_dir) / "mlflow_run.json"
        self.run_id, self.uri = "", ""

    def _resumable_run(self, resume: bool) -> str | None:
        """The run id in `mlflow_run.json` when resuming into the same store and experiment and the run still exists."""
        if not (resume and self.run_file.is_file()):
            return None
        import mlflow

        saved = json.loads(self.run_file.read_text())
        if saved.get("tracking_uri") != self.uri or saved.get("experiment") != self.cfg.experiment:
            return None
        try:
            return mlflow.get_run(saved["run_id"]).info.run_id
        except mlflow.exceptions.MlflowException:
            return None

    @contextlib.contextmanager
    def run(self, params: dict[str, Any], data_paths: tuple[str, ...], resume: bool) -> Iterator[None]:
        """Open the MLflow run: the checkpoints' run when `resume` (training continues them), else a new one.

        Args:
            params: flat `{key: value}` logged as MLflow params (a resumed run keeps the values it logged first).
            data_paths: the input data folders, tagged with their dvc.lock hashes (`dvc.<path>`).
            resume: the training continues its checkpoints (`groupvit.training.will_resume`).
        """
        if not self.enabled:
            yield
            return
        import mlflow

        self.uri = setup(self.cfg)
        resume_id = self._resumable_run(resume)
        tags = {"stage": "train", "git_commit": git_commit(),
                **{f"dvc.{path}": md5 for path, md5 in dvc_data_hashes(data_paths).items()}}
        # a run handed in by MLFLOW_RUN_ID (an ablation job's child run) keeps its own name
        keep_name = resume_id or os.environ.get("MLFLOW_RUN_ID")
        with mlflow.start_run(run_id=resume_id, run_name=None if keep_name else self.run_name,
                              log_system_metrics=self.cfg.system_metrics) as run:
            self.run_id = run.info.run_id
            mlflow.set_tags(tags)
            atomic_write(self.run_file, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                                    "experiment": self.cfg.experiment}) + "\n")
            logged = mlflow.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
            if changed:
                log.warning("resumed MLflow run %s keeps its original values of %s", self.run_id, ", ".join(changed))
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            yield

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """`fit`'s `log_fn`: one MLflow metric per key at `step`."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def finish(self, model_dir: Path, metrics: dict[str, Any], curve: Path) -> dict[str, Any] | None:
        """Log the final model, metrics and curve; register the model. Returns where it is registered (the record
        `write_model_record` keeps beside the weights), None when not enabled."""
        if not self.enabled:
            return None
        import mlflow

        mlflow.log_metrics({f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(model_dir), "model")
        mlflow.log_artifact(str(curve))
        out = {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.cfg.experiment,
               "artifact_uri": mlflow.get_artifact_uri("model")}
        if self.cfg.registered_model:
            version = register_model(self.cfg.registered_model, self.run_id, "model")
            out.update(name=self.cfg.registered_model, version=int(version),
                       model_uri=f"models:/{self.cfg.registered_model}/{version}")
        return out


# ---- the evaluate stage's run ------------------------------------------------------------------------------------

eval_log = logging.getLogger("groupvit.evaluate")  # messages of the evaluate stage's output


def mlflow_logger(tracking_cfg: Any, cfg: Any, seed: int) -> Callable[[dict, list[Path], list[Path]], None]:
    """`groupvit evaluate`'s tracking (`cfg`: its EvaluateConfig): log figures, pictures and tables to one MLflow
    run, tagged with the evaluated model's registered version.

    The run starts when the logger is made (before the evaluation), so its duration is the evaluation's. Each
    model's headline figures (`miou_test`, `miou_val`, `group_oracle`, ...) also go to the run that trained it (its
    `mlflow.json` record), so the runs table compares `train/groupvit` and `train/vit_pixelwise` by mIoU directly.
    """
    import time

    started = time.time()

    def log_run(results: dict, pictures: list[Path], tables: list[Path]) -> None:
        import mlflow

        from groupvit.evaluation.results import flat_metrics, headline_metrics  # evaluate's only: not train's deps

        tags = {"stage": "evaluate", "git_commit": git_commit()}
        records: dict[str, dict[str, Any]] = {}
        for spec in cfg.models:
            try:  # a stale or broken record loses the tags, never the evaluation
                meta = read_model_record(spec.path) if Path(spec.path).is_dir() else None
            except DataError as e:
                eval_log.warning("%s: not tagged with its MLflow record: %s", spec.name, e)
                meta = None
            records[spec.name] = meta or {}
            tags.update({f"{spec.name}.{k}": str(v) for k, v in (meta or {}).items()
                         if not isinstance(v, (dict, list))})
        report = cfg.report or next((s.name for s in reversed(cfg.segmentation) if s.name in results), "")
        val = next((s.bg_thresh_from for s in cfg.segmentation if s.name == report), "")
        headlines = {m: headline_metrics(results, m, report, val) for m in records if m in results.get(report, {})}
        with start_run(tracking_cfg, "evaluate", tags=tags, log_system_metrics=False, start_time=started) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in flat_dict({"evaluate": cfg}).items()})
            mlflow.log_param("base.seed", seed)
            mlflow.log_metrics(flat_metrics(results))
            mlflow.log_metrics({f"{k}/{m}": v for m, figures in headlines.items() for k, v in figures.items()})
            for model, figures in headlines.items():
                log_to_training_run(records[model], figures, run.info.run_id)
            for p in pictures:
                mlflow.log_artifact(str(p), artifact_path="pictures")
            for t in [*tables, Path(cfg.metrics_file)]:
                mlflow.log_artifact(str(t), artifact_path="tables")
    return log_run


def log_to_training_run(record: dict[str, Any], figures: dict[str, float], evaluate_run: str) -> None:
    """Put a model's headline figures on the MLflow run that trained it (when its record names one in this store)."""
    import mlflow

    run_id, uri = record.get("run_id"), record.get("tracking_uri")
    if not run_id or uri != mlflow.get_tracking_uri():
        return
    client = mlflow.MlflowClient(uri)
    try:
        if run_id == evaluate_run:  # the ablation's child run trains and evaluates: the names are logged as they are
            mlflow.log_metrics(figures)
        else:
            for name, value in figures.items():
                client.log_metric(run_id, name, value)
            client.set_tag(run_id, "evaluated_by", evaluate_run)
    except mlflow.exceptions.MlflowException as e:  # a deleted run: the evaluate run still has the figures
        eval_log.warning("the training run %s did not take the evaluation's figures: %s", run_id, e)

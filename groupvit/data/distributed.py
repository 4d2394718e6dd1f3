"""img2dataset on Spark or Ray (`download.distributor: pyspark | ray`): checks before any work, and the launcher.

img2dataset's `pyspark` distributor uses the active SparkSession (else it builds a `local[processes_count]` one
with a 16 GB driver); its `ray` distributor sends one task per shard to whatever `ray.init()` connects to (a new
throwaway local cluster when no address is given; nothing at all, silently, when ray does not import). So for these
two the download stage does not run img2dataset's CLI but this module (`launcher_command`): it creates the
SparkSession of `download.spark_master` or connects to the Ray head at `download.ray_address`, then runs
img2dataset's CLI entry point with the very same arguments, in the same process.

Shards are written by the executors / workers straight into `<work_dir>/raw`, so on a real cluster that folder must
be on a file system every node mounts at the same path, and the urls must be reachable from every node (the stage's
loopback image server is not: `check_distributor` refuses `serve_dir` with a remote cluster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from groupvit.data.config import DownloadConfig
from groupvit.errors import ConfigError, DataError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_MIN_JAVA = 17  # pyspark 4 runs on Java 17 or 21
_CONNECT_TIMEOUT_S = 5.0
# A safety bound on creating the SparkSession (a local-cluster waits for its worker JVMs: minutes on a loaded
# 2-core machine) or joining the Ray cluster (ray.init may retry for long): generous, it only ends a hung setup.
_SETUP_TIMEOUT_S = 600.0


class ClusterError(DataError):
    """The Spark or Ray run failed (an executor, worker or node lost beyond the engine's retries): nothing was
    published; the shards finished before it stay in `<work_dir>/raw` and a rerun fetches only the rest."""


def java_major_version(java: str) -> int | None:
    """The major version `java -version` reports (17 for "17.0.15", 8 for "1.8.0_402"), None when unreadable."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java() -> str | None:
    """The java pyspark will launch: `$JAVA_HOME/bin/java` when JAVA_HOME is set, else `java` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        return str(java) if java.is_file() else None
    return shutil.which("java")


def _host_port(address: str, key: str, example: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"download.{key}: expected host:port (e.g. {example}), found {address!r}")
    return host.strip("[]"), int(port)


def _check_connect(host: str, port: int, key: str, what: str, start: str) -> None:
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"download.{key}: no {what} answers at {host}:{port} ({e.strerror or e}); start it "
                          f"({start}) or point download.{key} at a running one") from None


def _check_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"download.distributor: {name} is not installed in {sys.prefix}; `make install` installs "
                          "the locked pyspark and ray")


def spark_conf(cfg: DownloadConfig) -> dict[str, str]:
    """`download.spark_conf` ("key=value" items) as a mapping, checked."""
    conf = {}
    for item in cfg.spark_conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("spark."):
            raise ConfigError(f"download.spark_conf: expected items 'spark.<name>=<value>' (e.g. "
                              f"spark.executor.memory=4g), found {item!r}")
        conf[key.strip()] = value.strip()
    return conf


def check_distributor(cfg: DownloadConfig) -> None:
    """Before any work: the engine is installed, Java is there for Spark, the cluster answers, the urls can be served.

    Raises:
        ConfigError: one line naming the key and what to install or start.
    """
    if cfg.distributor == "pyspark":
        _check_module("pyspark")
        java = find_java()
        if java is None:
            where = "in JAVA_HOME" if os.environ.get("JAVA_HOME") else "on PATH"
            raise ConfigError(f"download.distributor: pyspark needs Java {_MIN_JAVA}+ and no java was found {where}; "
                              "install Debian's default-jre-headless (`make java`)")
        major = java_major_version(java)
        if major is not None and major < _MIN_JAVA:
            raise ConfigError(f"download.distributor: pyspark needs Java {_MIN_JAVA}+, {java} is Java {major}; "
                              "install Debian's default-jre-headless (`make java`) or set JAVA_HOME")
        spark_conf(cfg)
        master = cfg.spark_master
        if master.startswith("spark://"):
            hosts = [_host_port(a, "spark_master", "spark://127.0.0.1:7077") for a in master[8:].split(",")]
            for host, port in hosts:
                _check_connect(host, port, "spark_master", "Spark master", "start-master.sh, start-worker.sh")
            remote = any(h not in _LOOPBACK for h, _ in hosts)
        elif master.startswith("local"):
            remote = False
        else:  # yarn, k8s://...: let Spark report its own errors
            remote = True
        if cfg.serve_dir and remote:
            raise ConfigError(f"download.serve_dir: the stage serves {cfg.serve_dir} on this machine's loopback "
                              f"address, which the executors of {master} cannot reach; serve the images over http "
                              "from a host they reach and set serve_dir ''")
    elif cfg.distributor == "ray":
        _check_module("ray")
        if not cfg.ray_address:
            raise ConfigError("download.ray_address: distributor ray needs the address of a running Ray head "
                              "(host:port, e.g. 127.0.0.1:6379 from `ray start --head`; README \"Many machines\")")
        host, port = _host_port(cfg.ray_address, "ray_address", "127.0.0.1:6379")
        _check_connect(host, port, "ray_address", "Ray head",
                       f"ray start --head --port {port} --node-ip-address {host}")
        if cfg.serve_dir and host not in _LOOPBACK:
            raise ConfigError(f"download.serve_dir: the stage serves {cfg.serve_dir} on this machine's loopback "
                              f"address, which the workers of the Ray cluster at {cfg.ray_address} cannot reach; "
                              "serve the images over http from a host they reach and set serve_dir ''")


def launcher_command(cfg: DownloadConfig, img2dataset_args: list[str], work_dir: Path) -> list[str]:
    """The command that runs img2dataset (its CLI arguments `img2dataset_args`) on the configured cluster."""
    engine = ["--spark-master", cfg.spark_master, "--spark-conf", json.dumps(spark_conf(cfg))] \
        if cfg.distributor == "pyspark" else ["--ray-address", cfg.ray_address]
    return [sys.executable, "-c", "import sys; from groupvit.data.distributed import main; sys.exit(main())",
            "--engine", cfg.distributor, "--work-dir", str(work_dir), *engine, "--", *img2dataset_args]


def _local_spark_home(work_dir: Path) -> Path:
    """A SPARK_HOME of links to the pip package's bin/, jars/, python/: a local-cluster's workers write executor logs
    to $SPARK_HOME/work, which would otherwise be inside the installed package. Only the last run's logs are kept."""
    import pyspark

    package, home = Path(pyspark.__file__).parent, work_dir / "spark"
    shutil.rmtree(home / "work", ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    for name in ("bin", "jars", "python", "sbin"):
        link = home / name
        if not link.is_symlink() or link.resolve() != (package / name).resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(package / name)
    return home


def _spark_session(master: str, conf: dict[str, str], work_dir: Path):  # noqa: ANN202 (pyspark is optional)
    """The session img2dataset's `pyspark_distributor` picks up; on a local master everything binds to loopback."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors' python: this environment's
    local = master.startswith("local")
    if local:
        os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # before the JVM starts: workers and executors too
        os.environ["SPARK_HOME"] = str(_local_spark_home(work_dir))
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName("groupvit-download")
    defaults = {"spark.ui.showConsoleProgress": "false"}
    if local:
        defaults.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                         "spark.ui.enabled": "false", "spark.driver.memory": "1g"})
        if master.startswith("local-cluster"):  # executors must fit the workers' memory, [n, cores, MB]
            defaults["spark.executor.memory"] = "512m"
    for key, value in {**defaults, **conf}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _exit_unless_done(seconds: float, what: str) -> threading.Timer:
    """A timer that ends this process (exit 3, one line on stderr for the stage's error) unless cancelled in time."""
    def expire() -> None:
        print(f"TimeoutError: {what} did not succeed within {seconds:.0f} s", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    """Set up the engine, then run img2dataset's CLI (`fire`) on the arguments after `--`."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="groupvit.data.distributed")
    parser.add_argument("--engine", choices=("pyspark", "ray"), required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--spark-conf", default="{}")
    parser.add_argument("--ray-address", default="")
    args = parser.parse_args(argv[:split])
    from img2dataset.main import main as img2dataset_main

    sys.argv = ["img2dataset", *argv[split + 1:]]
    if args.engine == "pyspark":
        timer = _exit_unless_done(_SETUP_TIMEOUT_S, f"creating the Spark session of {args.spark_master}")
        spark = _spark_session(args.spark_master, json.loads(args.spark_conf), args.work_dir)
        timer.cancel()
        try:
            img2dataset_main()
        finally:
            spark.stop()
    else:
        import ray

        timer = _exit_unless_done(_SETUP_TIMEOUT_S, f"connecting to the Ray head at {args.ray_address}")
        # An explicit address: never a new local cluster. Worker output comes back here, i.e. to img2dataset.log.
        ray.init(address=args.ray_address, log_to_driver=True)
        timer.cancel()
        try:
            img2dataset_main()
        finally:
            ray.shutdown()
    return 0

"""The DVC remote that publishes a retrain's data and models to other machines (no Prefect here; `retrain` calls it).

The remote is DVC's own configuration, not params: `dvc remote add -d shared /mnt/shared/groupvit-dvc` (or
`s3://...`, `gs://...`) writes `.dvc/config` (commit it: every clone then pushes and pulls there; credentials go in
`.dvc/config.local`, `dvc remote modify --local`). params `prefect.push` decides whether `retrain` pushes:
`auto` (default) to the default remote when there is one, `true` always (no default remote is an error), `false`
never.

    remote = push_target(workdir, cfg.push)        # None: nothing to push to
    if remote: check_remote(workdir, remote)       # before any `dvc repro`
    ...
    result = push(workdir, remote, on_line=logger.info)
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from groupvit.errors import ConfigError
from pipelines.workspace import CommandResult, run_streaming

CHECK_TIMEOUT_S = 60.0  # a cloud remote that has not answered by then is as good as unreachable


@dataclass(frozen=True)
class Remote:
    """A DVC remote: its name in `.dvc/config` and its url (DVC makes local paths absolute)."""

    name: str
    url: str

    @property
    def folder(self) -> Path | None:
        """The folder of a local remote; None for a cloud one."""
        parsed = urlparse(self.url)
        if parsed.scheme == "file":
            return Path(parsed.path)
        return Path(self.url) if parsed.scheme == "" else None


def push_target(workdir: str | os.PathLike[str], push: bool | Literal["auto"]) -> Remote | None:
    """The remote `retrain` pushes to under params `prefect.push`, or None when it pushes nowhere.

    Raises:
        ConfigError: `push: true` without a default remote.
    """
    if push is False:
        return None
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:  # the merged config: system, global, .dvc/config, .dvc/config.local
        name = repo.config["core"].get("remote")
        urls = {remote: conf["url"] for remote, conf in repo.config["remote"].items()}
    if name is None:
        if push is True:
            raise ConfigError(f"prefect.push is true but {workdir} has no default DVC remote: `dvc remote add -d "
                              "<name> <url>` (a shared folder, s3://..., gs://...), or set prefect.push: auto / false")
        return None
    if name not in urls:
        raise ConfigError(f"{workdir}/.dvc/config: the default DVC remote {name!r} is not defined "
                          f"(remotes: {', '.join(sorted(urls)) or 'none'})")
    return Remote(name, urls[name])


def _check_folder(remote: Remote, folder: Path) -> None:
    # never created here: a missing folder is most often an unmounted share, and a push into a new local folder would
    # publish nothing to the other machines
    if not folder.is_dir():
        raise ConfigError(f"DVC remote {remote.name!r}: folder {folder} does not exist (not mounted?); create or "
                          f"mount it, or point the remote elsewhere: dvc remote modify {remote.name} url <url>")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".groupvit-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"DVC remote {remote.name!r}: folder {folder} is not writable ({e.strerror})") from None


def _check_cloud(workdir: Path, remote: Remote, timeout: float) -> None:
    """List the remote's root through DVC's own filesystem (its plugin, credentials and endpoint)."""
    from dvc.repo import Repo

    failure: list[BaseException] = []

    def probe() -> None:
        try:
            with Repo(str(workdir)) as repo:
                cloud = repo.cloud.get_remote(remote.name)
                cloud.fs.exists(cloud.path)  # False is fine (an empty bucket prefix); an error is not
        except Exception as e:  # noqa: BLE001 (credentials, DNS, permissions: each plugin raises its own)
            failure.append(e)

    # a daemon thread: a probe hung in a cloud SDK's retries must not keep the flow (or its exit) waiting
    thread = threading.Thread(target=probe, name=f"dvc-remote-check-{remote.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    where = f"DVC remote {remote.name!r} ({remote.url})"
    if thread.is_alive():
        raise ConfigError(f"{where} did not answer within {timeout:g} s")
    if failure and isinstance(failure[0], ImportError):  # "s3 is supported, but requires 'dvc-s3' to be installed"
        raise ConfigError(f"{where}: {failure[0]}")
    if failure:
        raise ConfigError(f"{where} is not reachable: {type(failure[0]).__name__}: {failure[0]}")


def check_remote(workdir: str | os.PathLike[str], remote: Remote, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail with a ConfigError naming `remote` when `dvc push` could not reach it; changes nothing.

    A local folder must exist and take a file; any other remote must answer a listing through DVC (its plugin, such
    as `dvc-s3`, installed; its credentials valid) within `timeout` seconds.
    """
    folder = remote.folder
    if folder is not None:
        _check_folder(remote, folder)
    else:
        _check_cloud(Path(workdir), remote, timeout)


def push(workdir: str | os.PathLike[str], remote: Remote, on_line: Callable[[str], None]) -> CommandResult:
    """`dvc push -r <remote>`: every cached output `dvc.lock` records, streamed line by line to `on_line`."""
    return run_streaming([sys.executable, "-m", "dvc", "push", "-r", remote.name], workdir, on_line)

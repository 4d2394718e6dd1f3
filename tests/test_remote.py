"""The DVC remote: `retrain` pushes after a successful run, a second clone pulls the same versions; a remote or
tracking server it cannot reach fails the flow before any stage runs. A real Prefect server, real git and DVC, a local
directory remote (`dvc remote add -d shared <folder>`) and the toy pipeline of tests/_orchestration.py."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from _orchestration import dvc, git, make_toy_repo, toy_params, write_params  # noqa: I001 (sets PREFECT_HOME)
from prefect.testing.utilities import prefect_test_harness

from groupvit.errors import ConfigError
from pipelines.flows import retrain
from pipelines.remotes import Remote, check_remote, push_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def repo_with_remote(tmp_path: Path, remote: Path, **sections: dict) -> Path:
    """The toy train + evaluate pipeline with `remote` as its default DVC remote, committed like `.dvc/config` is."""
    params = toy_params(prefect={"commit": True}, **sections)
    repo = make_toy_repo(tmp_path / "repo", params, stages=("train", "evaluate"))
    # As dvc.yaml's train stage: the resumable checkpoints are not cached (so never pushed), and git ignores data/.
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"]["train"]["outs"] = [{"data/train": {"persist": True, "cache": False}}, "data/model"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (repo / "data").mkdir()
    (repo / "data/.gitignore").write_text("*\n!.gitignore\n")
    with (repo / ".dvc/config").open("a") as f:  # `dvc remote add -d shared <remote>`, without a DVC process
        f.write(f"[core]\n    remote = shared\n['remote \"shared\"']\n    url = {remote}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the shared DVC remote")
    return repo


def test_retrain_pushes_and_a_second_clone_pulls_the_same_versions(prefect_api, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    repo = repo_with_remote(tmp_path, remote, train={"quality": 0.75})
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["push"]["remote"] == "shared" and result["push"]["url"] == str(remote)
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"
    assert result["promotion"]["promoted"] and result["commit"]  # after the push; dvc.lock + metrics in git

    clone = tmp_path / "clone"  # another machine: git clone, then the data and the model from the remote
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data/model").exists()
    dvc(clone, "pull")
    assert (clone / "data/model/model.safetensors").read_bytes() == (repo / "data/model/model.safetensors").read_bytes()
    # The checkpoints are not pushed: DVC skips a stage whose only change is a missing output with --allow-missing
    # (a plain `dvc repro` would train again to recreate them).
    repro = dvc(clone, "repro", "--allow-missing")
    assert "Running stage" not in repro.stdout and "Data and pipelines are up to date." in repro.stdout, repro.stdout
    shown = json.loads(dvc(clone, "metrics", "show", "--json").stdout)[""]["data"]["metrics/evaluate.json"]["data"]
    assert shown == json.loads((repo / "metrics/evaluate.json").read_text()) and shown["miou"] == 0.75


def workspace(repo: Path) -> dict[str, bytes]:
    """Every file of the repository but git's own and DVC's temporary ones (the workspace lock)."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and not p.relative_to(repo).parts[0] == ".git" and ".dvc/tmp" not in str(p)}


def closed_port() -> int:
    with socket.socket() as s:  # nobody listens there once it is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_remote_or_server_fails_before_any_stage_and_a_failed_run_pushes_nothing(
        prefect_api, tmp_path):
    remote, port = tmp_path / "remote", closed_port()
    repo = repo_with_remote(tmp_path, remote)  # the remote folder does not exist: an unmounted share
    before = workspace(repo)
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_failed()
    assert f"DVC remote 'shared': folder {remote} does not exist (not mounted?)" in state.message
    assert workspace(repo) == before and not (repo / "dvc.lock").exists() and not remote.exists()  # no stage ran

    remote.mkdir()
    write_params(repo, toy_params(tracking={"uri": f"http://127.0.0.1:{port}"}))
    before = workspace(repo)
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_failed()
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in state.message
    assert workspace(repo) == before and not (repo / "dvc.lock").exists() and not any(remote.iterdir())

    write_params(repo, toy_params(train={"fail": True}))
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_failed() and "boom: the train stage was told to fail" in state.message
    assert not any(remote.iterdir())  # a failed run publishes nothing


def test_push_setting_and_cloud_remotes_without_their_plugin(tmp_path):
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    Repo.init(str(repo), no_scm=True).close()
    assert push_target(repo, "auto") is None  # no remote: nothing to push, no error
    with pytest.raises(ConfigError, match="prefect.push is true but .* has no default DVC remote"):
        push_target(repo, True)
    (repo / ".dvc/config").write_text("[core]\n    no_scm = true\n    remote = bucket\n['remote \"bucket\"']\n"
                                      "    url = s3://groupvit-test/dvc\n")  # dvc remote add -d bucket s3://...
    remote = push_target(repo, "auto")
    assert remote == Remote("bucket", "s3://groupvit-test/dvc") and push_target(repo, False) is None
    # The lock installs no dvc-s3: the check names the remote and the plugin before any work.
    with pytest.raises(ConfigError, match=r"DVC remote 'bucket' \(s3://groupvit-test/dvc\): .*requires 'dvc-s3'"):
        check_remote(repo, remote)

"""push_gptq_to_hub against a local Hub-protocol server, driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.numpy import save_file

from qalora_hf.hub import HubPushError, push_gptq_to_hub, redact_tokens
from qalora_hf.testing.hub_server import HubServer, git_blob_sha1

REPO = "local-user/tiny-qalora-gptq"
from conftest import HUB_TOKEN as TOKEN, _point_client_at  # noqa: E402
FILES = ("config.json", "model.safetensors", "adapter/adapter_config.json")
ROOT = Path(__file__).resolve().parents[1]

# huggingface_hub's LFS PUT passes a file object as `data=`; httpx2 warns about it (client-side, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def make_model(folder: Path, version: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "qalora_version": version,
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(version)
    save_file({"qweight": rng.integers(0, 2**31, (16, 64), dtype=np.int32),
               "scales": rng.standard_normal((2, 64)).astype(np.float16)}, str(folder / "model.safetensors"))
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "version": version}))
    return folder


def assert_same_files(local: Path, revision: str | None = None) -> None:
    for name in FILES:
        path = hf_hub_download(REPO, name, revision=revision)
        assert Path(path).read_bytes() == (local / name).read_bytes(), name


def test_push_and_download_roundtrip(hub, tmp_path):
    model = make_model(tmp_path / "model")
    oid = push_gptq_to_hub(model, REPO, backoff_s=0.01)

    assert len(oid) == 40 and HfApi().model_info(REPO).sha == oid
    assert any(method == "PUT" and "/lfs-upload/" in path for method, path in hub.requests)  # LFS transfer used
    tree = {f.path: f for f in HfApi().list_repo_tree(REPO, recursive=True) if hasattr(f, "lfs")}
    assert tree["model.safetensors"].lfs is not None
    assert tree["adapter/adapter_config.json"].lfs is None and tree["config.json"].lfs is None
    assert set(FILES) <= set(HfApi().list_repo_files(REPO))

    assert_same_files(model)
    snapshot = Path(snapshot_download(REPO))
    for name in FILES:
        assert (snapshot / name).read_bytes() == (model / name).read_bytes(), name


def test_second_push_creates_new_commit_and_keeps_old_one(hub, tmp_path):
    v1 = make_model(tmp_path / "v1", version=1)
    v2 = make_model(tmp_path / "v2", version=2)
    oid1 = push_gptq_to_hub(v1, REPO, backoff_s=0.01)
    oid2 = push_gptq_to_hub(v2, REPO, commit_message="v2", backoff_s=0.01)

    assert oid1 != oid2
    assert [c.commit_id for c in HfApi().list_repo_commits(REPO)][:2] == [oid2, oid1]
    assert_same_files(v2)  # main
    assert_same_files(v1, revision=oid1)
    assert_same_files(v2, revision=oid2)


def test_push_to_branch_leaves_main_untouched(hub, tmp_path):
    v1 = make_model(tmp_path / "v1", version=1)
    v2 = make_model(tmp_path / "v2", version=2)
    main_oid = push_gptq_to_hub(v1, REPO, backoff_s=0.01)
    branch = "exp/int4-g32"  # a '/' travels URL-encoded
    branch_oid = push_gptq_to_hub(v2, REPO, revision=branch, backoff_s=0.01)

    refs = {ref.name: ref.target_commit for ref in HfApi().list_repo_refs(REPO).branches}
    assert refs == {"main": main_oid, branch: branch_oid}
    assert_same_files(v1)
    assert_same_files(v2, revision=branch)


def test_missing_entries_map_to_hub_errors(hub, tmp_path):
    push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "adapter/missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local-user/no-such-repo", "config.json")


def test_transient_errors_are_retried(hub, tmp_path):
    model = make_model(tmp_path / "model")
    hub.fail_next(2, status=503)  # hits create_repo twice
    hub.fail_next(1, status=429, path_contains="/commit/")
    push_gptq_to_hub(model, REPO, backoff_s=0.01)

    assert hub.pending_faults == 0
    assert [p for m, p in hub.requests if p == "/api/repos/create"] == ["/api/repos/create"] * 3
    assert sum("/commit/" in p for _, p in hub.requests) == 2
    assert_same_files(model)


def test_connection_errors_are_retried_then_reported(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _point_client_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf_home")
    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, max_retries=2, backoff_s=0)
    assert info.value.attempts == 3 and info.value.status_code is None and info.value.step == "create_repo"


@pytest.mark.parametrize("status, path", [(401, "/api/repos/create"), (403, "/commit/")])
def test_auth_errors_are_not_retried(hub, tmp_path, status, path):
    hub.fail_next(5, status=status, path_contains=path)
    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    assert info.value.status_code == status and info.value.attempts == 1
    assert hub.pending_faults == 4


@pytest.mark.parametrize("via_env", [False, True])
def test_token_never_leaks(hub, tmp_path, monkeypatch, caplog, via_env):
    secret = "hf_SECRETxyz"
    monkeypatch.setenv("HF_TOKEN", secret)
    hub.fail_next(1, status=503, message=f"overloaded while checking {secret}")
    hub.fail_next(9, status=403, message=f"token {secret} (Bearer {secret}) cannot write here")
    caplog.set_level(logging.INFO)  # root: httpx2 logs each request line
    for name in ("qalora_hf", "huggingface_hub"):
        caplog.set_level(logging.DEBUG, logger=name)
    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, token=None if via_env else secret, backoff_s=0.01)

    err = info.value
    assert err.status_code == 403 and err.__cause__ is None and err.__context__ is None
    text = "".join(traceback.format_exception(err)) + repr(err.args)
    assert "cannot write here" in text and "***" in text  # the server message survives, redacted
    assert secret not in text
    assert "overloaded while checking ***" in caplog.text  # the retry was logged, redacted
    assert secret not in caplog.text


def test_redact_tokens():
    text = "token=hf_abcdefghijklmnopqrstuvwxyz0123 auth='Bearer abc.def' explicit=s3cr3t-value"
    cleaned = redact_tokens(text, ["s3cr3t-value", None])
    assert cleaned == "token=*** auth='Bearer ***' explicit=***"


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "ns/bad--name", "ns/", "/name", "-ns/x", "ns/x.",
                                     "ns/a b"])
def test_bad_repo_id_rejected_before_any_request(hub, tmp_path, repo_id):
    with pytest.raises(ValueError, match="namespace/name"):
        push_gptq_to_hub(make_model(tmp_path / "model"), repo_id)
    assert hub.requests == []


def test_bad_folder_rejected_before_any_request(hub, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        push_gptq_to_hub(tmp_path / "missing", REPO)
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="config.json"):
        push_gptq_to_hub(tmp_path / "no-config", REPO)
    assert hub.requests == []


def _fresh_env(url: str, hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and k != "PYTHONPATH"}
    env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home), PYTHONPATH=str(ROOT))
    return env


def test_cli_server_restarts_on_same_storage(tmp_path, monkeypatch):
    storage = tmp_path / "hub-storage"
    model = make_model(tmp_path / "model")
    with HubServer(storage) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        oid = push_gptq_to_hub(model, REPO, backoff_s=0.01)

    proc = subprocess.Popen([sys.executable, "-m", "qalora_hf.testing.hub_server", "--port", "0", "--storage",
                             str(storage)], stdout=subprocess.PIPE, text=True,
                            env=_fresh_env("unused", tmp_path / "cli_home"), cwd=ROOT)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        _point_client_at(monkeypatch, url, tmp_path / "hf_home2")
        assert HfApi().model_info(REPO).sha == oid
        assert_same_files(model, revision=oid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.stdout.read() == ""  # quiet: the URL line only


def test_transformers_autoconfig_resolves_from_server(hub, tmp_path):
    push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    code = ("from transformers import AutoConfig\n"
            f"config = AutoConfig.from_pretrained({REPO!r})\n"
            "print(config.model_type, config.hidden_size, config.qalora_version)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=_fresh_env(hub.url, tmp_path / "fresh_home"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["llama", "64", "1"]


def test_server_protocol_details(hub, tmp_path):
    import requests

    model = make_model(tmp_path / "model")
    oid = push_gptq_to_hub(model, REPO, backoff_s=0.01)
    weights = (model / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    url = f"{hub.url}/{REPO}/resolve/main/model.safetensors"

    head = requests.head(url)
    assert head.status_code == 200 and head.headers["ETag"] == f'"{sha256}"'
    assert head.headers["X-Linked-Etag"] == f'"{sha256}"' and head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["X-Repo-Commit"] == oid and head.headers["Content-Length"] == str(len(weights))
    assert not any(key.lower().startswith("x-xet") for key in head.headers)
    regular = requests.head(f"{hub.url}/{REPO}/resolve/{oid}/adapter/adapter_config.json")
    assert regular.headers["ETag"].strip('"') == git_blob_sha1((model / "adapter/adapter_config.json").read_bytes())

    part = requests.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == weights[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(weights)}"

    assert requests.put(f"{hub.url}/lfs-upload/{'0' * 64}", data=b"not matching").status_code == 400
    assert requests.get(f"{hub.url}/api/whoami-v2").status_code == 401
    assert HfApi().whoami()["name"] == "local-user"


def test_xet_enabled_client_fails_fast_with_hint(hub, tmp_path, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubPushError, match="HF_HUB_DISABLE_XET=1") as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    assert info.value.status_code == 501 and info.value.attempts == 1

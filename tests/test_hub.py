"""push_gptq_to_hub against a local Hub-protocol server, driven by the real huggingface_hub client."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
import types
from pathlib import Path
from urllib.parse import quote, urlsplit

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
    with HubServer(storage, token=TOKEN) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        oid = push_gptq_to_hub(model, REPO, backoff_s=0.01)

    proc = subprocess.Popen([sys.executable, "-m", "qalora_hf.testing.hub_server", "--port", "0", "--storage",
                             str(storage)], stdout=subprocess.PIPE, text=True,
                            env={**_fresh_env("unused", tmp_path / "cli_home"), "HF_TOKEN": TOKEN}, cwd=ROOT)
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

    assert requests.put(f"{hub.url}/lfs-upload/{'0' * 64}", data=b"not matching").status_code == 403  # unsigned
    assert requests.get(f"{hub.url}/api/whoami-v2").status_code == 401
    assert HfApi().whoami()["name"] == "local-user"


def test_xet_enabled_client_fails_fast_with_hint(hub, tmp_path, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubPushError, match="HF_HUB_DISABLE_XET=1") as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    assert info.value.status_code == 501 and info.value.attempts == 1


# --------------------------------------------------------------------------------------------------
# The server is safe to run: every attack below was accepted by the first version of the server.

OTHER_TOKEN = "hf_otherUserTokenNotSecret0123"


def _auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _post_commit(url: str, ops: list, *, repo: str = REPO, revision: str = "main", headers: dict | None = None):
    import requests

    lines = [{"key": "header", "value": {"summary": "crafted"}}, *ops]
    body = "\n".join(json.dumps(op) for op in lines).encode()
    return requests.post(f"{url}/api/models/{repo}/commit/{_segment(revision)}", data=body,
                         headers={"Content-Type": "application/x-ndjson", **(_auth() if headers is None else headers)})


def _state(hub) -> dict:
    """Repos, branches and commits as the server persisted them."""
    path = hub.storage_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _segment(text: str) -> str:
    """One URL path segment carrying ``text`` as is: '.' encoded too, or clients collapse '..' segments."""
    return quote(text, safe="").replace(".", "%2E")


def _lfs_upload_url(url: str, oid: str, size: int, repo: str = REPO, token: str = TOKEN) -> str:
    import requests

    batch = requests.post(f"{url}/{repo}.git/info/lfs/objects/batch", headers=_auth(token),
                          json={"operation": "upload", "transfers": ["basic"],
                                "objects": [{"oid": oid, "size": size}], "hash_algo": "sha256"})
    assert batch.status_code == 200, batch.text
    return batch.json()["objects"][0]["actions"]["upload"]["href"]


def _partial_uploads(storage: Path) -> list[Path]:
    return sorted((storage / "blobs").glob(".upload.*.tmp"))


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_traversal_oid_is_refused_and_host_files_are_never_served(hub, tmp_path):
    import requests

    secret = b"HOST FILE OUTSIDE THE STORAGE " + os.urandom(8).hex().encode()
    (tmp_path / "host-secret.txt").write_bytes(secret)  # hub storage is tmp_path/hub-storage/blobs
    HfApi().create_repo(REPO)
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").is_file() else None
    bad_oids = ["../../host-secret.txt", "../" * 30 + "etc/passwd", "/etc/passwd", str(tmp_path / "host-secret.txt"),
                "A" * 64, "0" * 63, "0" * 65, "g" * 64, "0" * 64 + "/../../host-secret.txt", "", None, 123]
    for oid in bad_oids:
        answer = _post_commit(hub.url, [{"key": "lfsFile", "value": {"path": "leak.bin", "algo": "sha256",
                                                                       "oid": oid}}])
        assert answer.status_code == 400 and "Invalid LFS oid" in answer.headers["X-Error-Message"], (oid, answer)
        batch = requests.post(f"{hub.url}/{REPO}.git/info/lfs/objects/batch", headers=_auth(),
                              json={"operation": "upload", "objects": [{"oid": oid, "size": 10}]})
        assert batch.status_code == 400, (oid, batch.text)
        if isinstance(oid, str) and oid:
            put = requests.put(f"{hub.url}/lfs-upload/{quote(oid, safe='')}", data=secret)
            assert put.status_code == 400, (oid, put.status_code)

    assert list(_state(hub)[REPO]["commits"].values())[-1]["title"] == "initial commit"  # nothing committed
    responses = [requests.get(f"{hub.url}/{REPO}/resolve/main/leak.bin"),
                 requests.get(f"{hub.url}/api/models/{REPO}"),
                 requests.get(f"{hub.url}/api/models/{REPO}/tree/main?recursive=true")]
    assert responses[0].status_code == 404
    for answer in responses:
        assert secret not in answer.content
        assert passwd is None or passwd not in answer.content


def test_blob_ids_from_a_tampered_state_are_not_followed(tmp_path, monkeypatch):
    """A state.json written by an older, unchecked server (or edited by hand) cannot make the server read a host file."""
    import requests

    storage, secret = tmp_path / "hub-storage", b"HOST FILE " + os.urandom(8).hex().encode()
    (tmp_path / "host-secret.txt").write_bytes(secret)
    with HubServer(storage, token=TOKEN) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    state = json.loads((storage / "state.json").read_text())
    for commit in state[REPO]["commits"].values():
        if "model.safetensors" in commit["tree"]:
            commit["tree"]["model.safetensors"].update(sha256="../../host-secret.txt", size=len(secret))
    (storage / "state.json").write_text(json.dumps(state))

    with HubServer(storage, token=TOKEN) as server:
        answer = requests.get(f"{server.url}/{REPO}/resolve/main/model.safetensors", headers=_auth())
        assert answer.status_code == 500 and secret not in answer.content
        assert requests.get(f"{server.url}/{REPO}/resolve/main/config.json").status_code == 200  # the rest still works


BAD_PATHS = ["../escape.txt", "a/../../escape.txt", "adapter/..", "..", ".", "./config.json", "a/./b.txt",
             "/etc/hosts", "//etc/hosts", "C:/Windows/x.txt", "a//b.txt", "a/", "", "..\\escape.txt",
             "a\\..\\..\\escape.txt", "a\x00b.txt", "a\nb.txt", ".git/config", "sub/.git/hooks/post-commit",
             "x" * 1100]


def test_bad_paths_are_refused_in_commits_resolve_and_tree(hub, tmp_path):
    import requests

    model = make_model(tmp_path / "model")
    push_gptq_to_hub(model, REPO, backoff_s=0.01)
    before = _state(hub)
    files_before = sorted(HfApi().list_repo_files(REPO))
    weights_oid = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    content = base64.b64encode(b"planted").decode()
    for path in BAD_PATHS:
        for op in ({"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}},
                   {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": weights_oid}},
                   {"key": "deletedFile", "value": {"path": path}}):
            answer = _post_commit(hub.url, [op])
            assert answer.status_code == 400 and "Invalid path" in answer.headers["X-Error-Message"], (path, op["key"])
        preupload = requests.post(f"{hub.url}/api/models/{REPO}/preupload/main", headers=_auth(),
                                  json={"files": [{"path": path, "size": 7, "sample": content}]})
        assert preupload.status_code == 400, path
        if path:
            assert requests.get(f"{hub.url}/{REPO}/resolve/main/{_segment(path)}").status_code == 400, path
            assert requests.head(f"{hub.url}/{REPO}/resolve/main/{_segment(path)}").status_code == 400, path
        if path and not path.endswith("/"):  # a folder may be listed as "a/"
            tree = requests.get(f"{hub.url}/api/models/{REPO}/tree/main/{_segment(path)}")
            assert tree.status_code == 400, path
    for folder in ("..", "../", "/", "a/../..", "/etc"):
        answer = _post_commit(hub.url, [{"key": "deletedFolder", "value": {"path": folder}}])
        assert answer.status_code == 400, folder

    assert _state(hub) == before  # no commit, no branch, nothing planted
    assert sorted(HfApi().list_repo_files(REPO)) == files_before
    ok = _post_commit(hub.url, [{"key": "file", "value": {"path": "notes/ok..txt", "content": content,
                                                          "encoding": "base64"}}])
    assert ok.status_code == 200  # '..' inside a name is not a traversal
    assert Path(hf_hub_download(REPO, "notes/ok..txt")).read_bytes() == b"planted"


BAD_BRANCHES = ["a..b", "..", "-x", "--force", "x.lock", "a/b.lock", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[b",
                "a\\b", "x/", "/x", "a//b", ".hidden", "a/.b", "@", "a@{1}", "x.", "tab\tx", "nul\x00x", "del\x7fx",
                "0" * 40, "b" * 256]


def test_bad_branch_names_are_refused(hub, tmp_path):
    import requests

    from huggingface_hub.errors import BadRequestError

    push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    before = _state(hub)
    content = base64.b64encode(b"x").decode()
    for branch in BAD_BRANCHES:
        created = requests.post(f"{hub.url}/api/models/{REPO}/branch/{_segment(branch)}", headers=_auth(),
                                json={})
        assert created.status_code == 400, (branch, created.status_code)
        committed = _post_commit(hub.url, [{"key": "file", "value": {"path": "f.txt", "content": content}}],
                                 revision=branch)
        assert committed.status_code == 400, (branch, committed.status_code)
        if branch != "0" * 40:  # a commit id is a valid revision to read
            for url in (f"{hub.url}/api/models/{REPO}/revision/{_segment(branch)}",
                        f"{hub.url}/{REPO}/resolve/{_segment(branch)}/config.json"):
                assert requests.get(url).status_code == 400, (branch, url)
    bad_start = requests.post(f"{hub.url}/api/models/{REPO}/branch/fine", headers=_auth(),
                              json={"startingPoint": "main..x"})
    assert bad_start.status_code == 400
    with pytest.raises(BadRequestError):  # what the real client sees
        HfApi().create_branch(REPO, branch="a..b")
    assert _state(hub) == before  # no branch was created by any of them

    for good in ("exp/int4-g32", "v1.0", "feature_x-2", "a.b/c"):
        HfApi().create_branch(REPO, branch=good)
    assert {ref.name for ref in HfApi().list_repo_refs(REPO).branches} == {"main", "exp/int4-g32", "v1.0",
                                                                           "feature_x-2", "a.b/c"}


BAD_AUTH = [{}, {"Authorization": "Bearer hf_wrongTokenButRealisticLength01"}, {"Authorization": "Basic eDp4"},
            {"Authorization": "Bearer"}, {"Authorization": TOKEN}, {"Authorization": f"Token {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"}]


def test_writes_need_the_configured_token(hub, tmp_path):
    import requests

    model = make_model(tmp_path / "model")
    push_gptq_to_hub(model, REPO, backoff_s=0.01)
    before = _state(hub)
    weights = (model / "model.safetensors").read_bytes()
    content = base64.b64encode(b"planted").decode()
    for headers in BAD_AUTH:
        writes = {
            "create": requests.post(f"{hub.url}/api/repos/create", headers=headers,
                                    json={"name": "planted", "organization": "local-user"}),
            "commit": _post_commit(hub.url, [{"key": "file", "value": {"path": "planted.txt", "content": content}}],
                                   headers=headers),
            "branch": requests.post(f"{hub.url}/api/models/{REPO}/branch/planted", headers=headers, json={}),
            "preupload": requests.post(f"{hub.url}/api/models/{REPO}/preupload/main", headers=headers,
                                       json={"files": [{"path": "planted.txt", "size": 7, "sample": content}]}),
            "lfs batch": requests.post(f"{hub.url}/{REPO}.git/info/lfs/objects/batch", headers=headers,
                                       json={"operation": "upload", "objects": [
                                           {"oid": hashlib.sha256(b"planted").hexdigest(), "size": 7}]}),
            "lfs put": requests.put(f"{hub.url}/lfs-upload/{hashlib.sha256(weights).hexdigest()}", headers=headers,
                                    data=weights),
        }
        for name, answer in writes.items():
            expected = 403 if name == "lfs put" and not headers else 401  # upload URLs are signed instead
            assert answer.status_code == expected, (headers, name, answer.status_code)
    assert _state(hub) == before

    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(model, "local-user/another", token="hf_wrongTokenButRealisticLength01", backoff_s=0.01)
    assert info.value.status_code == 401 and info.value.attempts == 1
    assert "local-user/another" not in _state(hub)


def test_writes_into_another_namespace_are_refused(hub, tmp_path):
    model = make_model(tmp_path / "model")
    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(model, "someone-else/model", backoff_s=0.01)
    assert info.value.status_code == 403 and info.value.step == "create_repo" and info.value.attempts == 1
    assert "someone-else/model" not in _state(hub)
    push_gptq_to_hub(model, REPO, backoff_s=0.01)  # its own namespace still works


def test_tokens_map_to_namespaces(tmp_path, monkeypatch):
    alice, bob = "hf_aliceTokenNotSecret0123456", "hf_bobTokenNotSecret012345678"
    model = make_model(tmp_path / "model")
    with HubServer(tmp_path / "hub-storage", tokens={alice: ["alice", "team"], bob: ["bob"]}) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", alice)
        me = HfApi().whoami(token=alice)
        assert me["name"] == "alice" and [org["name"] for org in me["orgs"]] == ["team"]
        assert HfApi().whoami(token=bob)["name"] == "bob"
        first = push_gptq_to_hub(model, "alice/m", token=alice, backoff_s=0.01)
        push_gptq_to_hub(model, "team/m", token=alice, backoff_s=0.01)
        for repo, step in (("alice/m", "upload_folder"), ("team/new", "create_repo")):  # bob is in neither
            with pytest.raises(HubPushError) as info:
                push_gptq_to_hub(make_model(tmp_path / "v2", version=2), repo, token=bob, backoff_s=0.01)
            assert info.value.status_code == 403 and info.value.step == step, repo
        assert HfApi().model_info("alice/m").sha == first
        assert "team/new" not in json.loads((server.storage_dir / "state.json").read_text())


def test_private_repos_need_a_valid_token_of_their_namespace(tmp_path, monkeypatch):
    import requests

    private = "local-user/private-model"
    model = make_model(tmp_path / "model")
    config = (model / "config.json").read_bytes()
    with HubServer(tmp_path / "hub-storage", tokens={TOKEN: ["local-user"], OTHER_TOKEN: ["other-user"]}) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        oid = push_gptq_to_hub(model, private, private=True, backoff_s=0.01)
        reads = [("GET", f"/api/models/{private}"), ("GET", f"/api/models/{private}/revision/main"),
                 ("GET", f"/api/models/{private}/tree/main?recursive=true"), ("GET", f"/api/models/{private}/refs"),
                 ("GET", f"/api/models/{private}/commits/main"), ("GET", f"/{private}/resolve/main/config.json"),
                 ("HEAD", f"/{private}/resolve/main/config.json"), ("GET", f"/{private}/resolve/{oid}/config.json")]
        for headers in [*BAD_AUTH, _auth(OTHER_TOKEN)]:
            for method, path in reads:
                answer = requests.request(method, server.url + path, headers=headers)
                assert answer.status_code in (401, 404), (headers, method, path, answer.status_code)
                assert config not in answer.content and oid not in answer.text
        for method, path in reads:
            assert requests.request(method, server.url + path, headers=_auth()).status_code == 200, path
        other_write = requests.post(f"{server.url}/api/models/{private}/preupload/main", headers=_auth(OTHER_TOKEN),
                                    json={"files": [{"path": "x.txt", "size": 1, "sample": ""}]})
        assert other_write.status_code == 404  # a private repo does not exist for other users, not even as 403

        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(private, "config.json", token=False)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(private, "config.json", token=OTHER_TOKEN)
        assert Path(hf_hub_download(private, "config.json")).read_bytes() == config  # HF_TOKEN is TOKEN


def test_lfs_uploads_need_a_signed_url_and_the_announced_size(hub, tmp_path):
    import requests

    HfApi().create_repo(REPO)
    data = os.urandom(4096)
    oid = hashlib.sha256(data).hexdigest()
    unsigned = requests.put(f"{hub.url}/lfs-upload/{oid}", data=data, headers=_auth())
    assert unsigned.status_code == 403 and not (hub.storage_dir / "blobs" / oid).exists()
    href = _lfs_upload_url(hub.url, oid, len(data))
    assert requests.put(href.replace(f"size={len(data)}", f"size={len(data) + 8}"), data=data + b"8 more!!"
                        ).status_code == 403  # size is part of the signature
    assert requests.put(href, data=data + b"more").status_code == 400  # more than announced
    assert requests.put(href, data=data[:-1]).status_code == 400
    assert requests.put(href.replace(oid, hashlib.sha256(b"x").hexdigest()), data=b"x").status_code == 403
    assert requests.put(href, data=iter([data[:100], data[100:], b"!"])).status_code == 400  # chunked, too long
    assert not (hub.storage_dir / "blobs" / oid).exists() and _partial_uploads(hub.storage_dir) == []
    assert requests.put(href, data=iter([data[:100], data[100:]])).status_code == 200  # chunked transfer
    assert (hub.storage_dir / "blobs" / oid).read_bytes() == data


def _start_partial_put(href: str, size: int, sent: int) -> socket.socket:
    """A raw HTTP PUT that announces ``size`` bytes and sends only ``sent`` of them."""
    url = urlsplit(href)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {size}\r\n\r\n"
                 .encode() + b"\0" * sent)
    return sock


def test_partial_uploads_are_removed_on_stall_and_on_disconnect(tmp_path):
    storage, size = tmp_path / "hub-storage", 8 << 20
    oid = hashlib.sha256(b"\0" * size).hexdigest()
    with HubServer(storage, token=TOKEN, request_timeout_s=0.5) as server:
        with _start_partial_put(_lfs_upload_url(server.url, oid, size, repo=_create(server.url)), size, 1 << 20):
            assert _wait_for(lambda: _partial_uploads(storage))  # the upload is under way
            assert _wait_for(lambda: not _partial_uploads(storage), timeout_s=10)  # stalled client: dropped

        with _start_partial_put(_lfs_upload_url(server.url, oid, size), size, 1 << 20):
            assert _wait_for(lambda: _partial_uploads(storage))
        assert _wait_for(lambda: not _partial_uploads(storage))  # client gone: removed
        assert not (storage / "blobs" / oid).exists()

        with pytest.raises(RuntimeError, match="in use by another hub server"):  # it would sweep live uploads
            HubServer(storage, token=TOKEN).start()


def _create(url: str) -> str:
    import requests

    answer = requests.post(f"{url}/api/repos/create", headers=_auth(), json={"name": REPO.split("/")[1]})
    assert answer.status_code == 200, answer.text
    return REPO


def test_partial_upload_of_a_killed_server_is_swept_at_start(tmp_path):
    storage, size = tmp_path / "hub-storage", 50 << 20
    env = {**_fresh_env("unused", tmp_path / "cli_home"), "HF_TOKEN": TOKEN}
    command = [sys.executable, "-m", "qalora_hf.testing.hub_server", "--port", "0", "--storage", str(storage)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        url = proc.stdout.readline().strip()
        _create(url)
        href = _lfs_upload_url(url, hashlib.sha256(b"\0" * size).hexdigest(), size)
        with _start_partial_put(href, size, 4 << 20):
            assert _wait_for(lambda: _partial_uploads(storage) and _partial_uploads(storage)[0].stat().st_size > 0)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len(_partial_uploads(storage)) == 1  # what kill -9 leaves behind

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().startswith("http://127.0.0.1:")  # the lock died with the killed server
        assert _partial_uploads(storage) == []
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "removed 1 partial upload" in stderr


def test_lfs_upload_failure_keeps_its_cause(hub, tmp_path):
    secret = os.environ["HF_TOKEN"]  # the token in use (TOKEN)
    hub.fail_next(5, status=403, path_contains="/lfs-upload/", message=f"storage quota exceeded for {secret}")
    with pytest.raises(HubPushError) as info:
        push_gptq_to_hub(make_model(tmp_path / "model"), REPO, backoff_s=0.01)
    err, text = info.value, str(info.value)
    assert err.step == "upload_folder" and err.status_code == 403 and err.attempts == 1  # 403 is not retried
    assert "Error while uploading 'model.safetensors'" in text and "403" in text
    assert "storage quota exceeded for ***" in text and secret not in text
    assert hub.pending_faults == 4


def test_transient_lfs_upload_failure_is_retried(hub, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda _s: None))  # client's own backoff
    model = make_model(tmp_path / "model")
    hub.fail_next(6, status=503, path_contains="/lfs-upload/")  # outlasts huggingface_hub's 1 + 5 tries per PUT
    oid = push_gptq_to_hub(model, REPO, backoff_s=0.01)

    assert hub.pending_faults == 0
    assert sum(m == "PUT" and "/lfs-upload/" in p for m, p in hub.requests) == 7  # 6 failed + 1 by our retry
    assert HfApi().model_info(REPO).sha == oid
    assert_same_files(model)

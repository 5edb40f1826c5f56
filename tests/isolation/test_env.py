"""The engine's environment: an allow-list of poolmgr's, the engine's own, and never a secret."""

from __future__ import annotations

from pathlib import Path

from poolmgr.isolation._env import engine_environment, is_secret

PARENT = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "POOL_MANAGERD_API_TOKEN": "s3cret",
    "POOL_MANAGERD_DATABASE_URL": "postgresql://u:pw@db/x",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "HF_TOKEN": "hf",
    "DB_PASSWORD": "pw",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "SSH_AUTH_SOCK": "/run/ssh",
    "PYTHONPATH": "/evil",
    "LD_PRELOAD": "/evil.so",
}
WORKDIR = Path("/var/lib/poolmgr/engines/tiny")


def test_clean_env_keeps_only_the_allow_list_and_the_engine_env() -> None:
    env = engine_environment(PARENT, {"CUDA_VISIBLE_DEVICES": "GPU-1", "LLAMA_ARG_THREADS": "4"}, workdir=WORKDIR)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "CUDA_VISIBLE_DEVICES": "GPU-1",
        "LLAMA_ARG_THREADS": "4",
        "HOME": str(WORKDIR),
        "TMPDIR": str(WORKDIR),
    }


def test_secrets_are_dropped_even_when_passed_as_engine_env() -> None:
    env = engine_environment({}, {"LLAMA_API_KEY": "k", "POOL_MANAGERD_ADDR": "x", "MY_TOKEN": "t"}, workdir=WORKDIR)
    assert not {"LLAMA_API_KEY", "POOL_MANAGERD_ADDR", "MY_TOKEN"} & set(env)
    assert env["PATH"]  # a default PATH when poolmgr had none


def test_unclean_env_passes_the_rest_but_still_no_secret_nor_loader_hook() -> None:
    env = engine_environment(PARENT, {}, workdir=WORKDIR, clean=False)
    assert env["SSH_AUTH_SOCK"] == "/run/ssh"
    assert not any(v in env.values() for v in ("s3cret", "aws", "hf", "pw", "/evil", "/evil.so"))
    assert env["HOME"] == str(WORKDIR)


def test_secret_names() -> None:
    assert is_secret("pool_managerd_anything")
    assert is_secret("OPENAI_API_KEY") and is_secret("Github_Token") and is_secret("X_PASSWORD")
    assert not is_secret("CUDA_MPS_PIPE_KEYDIR")  # CUDA_* is never a secret
    assert not is_secret("PATH")

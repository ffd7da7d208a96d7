"""compose.yaml and Dockerfile agree with what ``kvtriton serve`` accepts (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kvtriton.backend.entrypoints.serve import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def triton(compose) -> dict:
    return compose["services"]["triton"]


def _serve_args(service: dict):
    command = service["command"]
    assert command[:2] == ["kvtriton", "serve"], command
    # argparse exits (SystemExit) on any option serve does not accept.
    return build_parser().parse_args(command[2:])


def _volume_target(service: dict, source: str) -> str:
    targets = [v.split(":")[1] for v in service["volumes"] if v.split(":")[0] == source]
    assert len(targets) == 1, f"{source!r} mounted {len(targets)} times in {service['volumes']}"
    return targets[0]


def test_triton_command_is_a_valid_serve_invocation_matching_published_ports(triton):
    args = _serve_args(triton)
    published = {}
    for mapping in triton["ports"]:
        host, container = str(mapping).split(":")
        assert host == container, f"{mapping}: keep the standard Triton ports on the host too"
        published[int(container)] = mapping
    assert {args.http_port, args.grpc_port, args.metrics_port, args.openai_port} == set(published)
    assert (args.http_port, args.grpc_port, args.metrics_port, args.openai_port) == (8000, 8001, 8002, 9000)
    assert str(args.model_repository) == _volume_target(triton, "models")


def test_triton_reserves_gpus(triton):
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_triton_has_room_in_dev_shm_for_the_python_backend(triton):
    size = re.fullmatch(r"(\d+)(gb|mb)", str(triton["shm_size"]).lower())
    assert size, triton["shm_size"]
    megabytes = int(size[1]) * (1024 if size[2] == "gb" else 1)
    assert megabytes >= 1024  # Docker's 64 MB default is too small for streamed tensors


def test_triton_healthcheck_runs_a_request_through_the_model_on_the_grpc_port(triton):
    """Triton's readiness stays 200 when a model's stub or engine has died: the check generates a token."""
    import argparse

    from kvtriton.client import health_cmd

    args = _serve_args(triton)
    test = triton["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["kvtriton", "health"]
    parser = argparse.ArgumentParser()
    health_cmd.add_arguments(parser)
    health = parser.parse_args(test[3:])  # a command `kvtriton health` accepts
    assert health.url == f"127.0.0.1:{args.grpc_port}"
    assert health.timeout < int(str(triton["healthcheck"]["timeout"]).rstrip("s"))


def test_triton_listens_on_every_interface_inside_the_container_and_keeps_admin_apis_keyed(triton):
    assert _serve_args(triton).host == "0.0.0.0"  # kvtriton serve alone listens on loopback only
    assert "KVTRITON_ADMIN_KEY" in triton["environment"]


def test_model_cache_volume_and_env(compose, triton):
    builder = compose["services"]["model-builder"]
    for service in (triton, builder):
        assert service["environment"]["KVTRITON_CACHE"] == _volume_target(service, "model-cache")
    assert {"models", "model-cache"} <= set(compose["volumes"])


def test_builder_runs_only_under_the_build_profile_and_writes_the_served_repository(compose, triton):
    builder = compose["services"]["model-builder"]
    assert builder["profiles"] == ["build"]
    assert "profiles" not in triton  # `docker compose up` starts the server
    assert builder["command"][:2] == ["kvtriton", "build"]
    served = str(_serve_args(triton).model_repository)
    assert _volume_target(builder, "models") == served
    import argparse

    from kvtriton.build import cli as build_cli

    parser = argparse.ArgumentParser()
    build_cli.add_arguments(parser)
    assert parser.parse_args(builder["command"][2:]).out == served  # a command `kvtriton build` accepts
    assert builder["image"] == triton["image"]  # one image: the builder's output is what serve loads


def test_dockerfile_uses_a_triton_image_at_least_2_51_and_installs_kvtriton_with_numpy_below_2():
    text = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\d\d)\.(\d\d)-py3$", text, re.M)
    assert tag, "Dockerfile must pin ARG TRITON_TAG=<yy.mm>-py3"
    assert (int(tag[1]), int(tag[2])) >= (24, 10)  # 24.10 ships Triton 2.51.0
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in text
    assert re.search(r'pip install "/src\[onnx,openai\]" "numpy<2"', text)  # openai: the frontend on 9000
    assert "COPY model_repository /models" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd[1])[:2] == ["kvtriton", "serve"]
    assert build_parser().parse_args(yaml.safe_load(cmd[1])[2:]).host == "0.0.0.0"

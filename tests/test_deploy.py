"""deploy/: every Kubernetes manifest passes `kubernetes-validate --strict`, the pieces refer to each
other consistently, and every flag they pass is a real option of the `promptcast` command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from encoder_server.server import SERVICE_NAME
from promptcast.cli import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def validator() -> str:
    found = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(found).exists():
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]'")
    return found


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([validator(), "--strict", "--no-warn", str(path)], capture_output=True, text=True,
                          timeout=120)


def resources() -> dict[tuple[str, str], dict]:
    """`{(kind, name): resource}` over every manifest file."""
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def options(command: str) -> set[str]:
    params = get_command(app).commands[command].params
    return {opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


def flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def entrypoint(dockerfile: str) -> list[str]:
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_there_are_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"encoder-deployment.yaml", "encoder-service.yaml", "redis.yaml", "denoiser-job.yaml",
            "secret.example.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate_strict(path):
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    # The check above can fail: a typo'd field in the encoder Deployment is refused.
    broken = (DEPLOY / "k8s" / "encoder-deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:")
    (tmp_path / "broken.yaml").write_text(broken)
    result = validate(tmp_path / "broken.yaml")
    assert result.returncode != 0 and "readinesProbe" in result.stdout + result.stderr


def test_encoder_deployment_gpu_probes_and_secrets():
    found = resources()
    deployment = found[("Deployment", "promptcast-encoder")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = entrypoint("Dockerfile.encoder")[2:] + container["args"]  # image ENTRYPOINT + manifest args
    assert entrypoint("Dockerfile.encoder")[:2] == ["promptcast", "serve"]
    assert set(flags(args)) <= options("serve"), set(flags(args)) - options("serve")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(flag_value(args, "--port"))
    assert ports["health"] == int(flag_value(args, "--health-port"))
    assert ports["metrics"] == int(flag_value(args, "--metrics-port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert pod["terminationGracePeriodSeconds"] > float(flag_value(args, "--grace"))
    # TLS and tokens: files from Secrets that the example defines, with the keys it defines.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for flag, volume in (("--tls-cert", "tls"), ("--tls-key", "tls"), ("--token-file", "auth")):
        path = Path(flag_value(args, flag))
        assert str(path.parent) == mounts[volume], flag
        secret = volumes[volume]["secret"]
        assert path.name in {item["path"] for item in secret["items"]}
        example = found[("Secret", secret["secretName"])]
        assert {item["key"] for item in secret["items"]} <= set(example["stringData"])
    redis_url = flag_value(args, "--cache-redis")
    assert redis_url.startswith("redis://promptcast-redis:6379")
    assert found[("Service", "promptcast-redis")]["spec"]["ports"][0]["port"] == 6379
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in found
    # The model worker process hands batches over in /dev/shm: memory-backed, past the container default of 64 MiB.
    dshm = next(name for name, path in mounts.items() if path == "/dev/shm")
    assert volumes[dshm]["emptyDir"]["medium"] == "Memory" and volumes[dshm]["emptyDir"]["sizeLimit"] == "2Gi"


def test_headless_service_selects_the_encoder_pods():
    found = resources()
    service = found[("Service", "promptcast-encoder")]
    labels = found[("Deployment", "promptcast-encoder")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"  # DNS returns every pod: client-side balancing
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 50051


def test_denoiser_indexed_job_splits_the_job_file():
    found = resources()
    job = found[("Job", "promptcast-batch")]
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "batch" and args[1] == "/jobs/input.jsonl"
    assert set(flags(args)) <= options("batch"), set(flags(args)) - options("batch")
    assert flag_value(args, "--shard") == f"$(JOB_COMPLETION_INDEX)/{job['spec']['completions']}"
    assert "$(JOB_COMPLETION_INDEX)" in flag_value(args, "--out-dir")  # one folder per shard: no shared lock
    namespace = job["metadata"]["namespace"]
    assert flag_value(args, "--encoder") == f"dns:///promptcast-encoder.{namespace}.svc.cluster.local:50051"
    env = {e["name"]: e for e in container["env"]}
    token_ref = env["PROMPTCAST_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref["key"] in found[("Secret", token_ref["name"])]["stringData"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert ("ConfigMap", volumes["jobs"]["configMap"]["name"]) in found
    assert "input.jsonl" in found[("ConfigMap", volumes["jobs"]["configMap"]["name"])]["data"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_compose_file_services_and_flags():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"encoder", "redis", "denoiser", "prometheus"} <= set(services)
    encoder_args = entrypoint("Dockerfile.encoder")[2:] + services["encoder"]["command"]
    assert set(flags(encoder_args)) <= options("serve")
    assert flag_value(encoder_args, "--cache-redis").startswith("redis://redis:")
    assert services["encoder"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["encoder"]["shm_size"] == "2gb"  # the model worker process's batches, past Docker's 64 MiB
    denoiser_args = services["denoiser"]["command"]
    assert denoiser_args[0] == "batch" and set(flags(denoiser_args)) <= options("batch")
    assert flag_value(denoiser_args, "--encoder") == f"encoder:{flag_value(encoder_args, '--port')}"
    for name in ("encoder", "denoiser"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
    # Prometheus scrapes the encoder's metrics port, with the config file compose mounts.
    mount = next(v for v in services["prometheus"]["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    prometheus = yaml.safe_load((DEPLOY / mount.split(":")[0]).read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"encoder:{flag_value(encoder_args, '--metrics-port')}" in targets
    secret_file = compose["secrets"]["promptcast_tokens"]["file"]
    assert flag_value(encoder_args, "--token-file") == "/run/secrets/promptcast_tokens" and secret_file


@pytest.mark.parametrize("dockerfile,base", [("Dockerfile.encoder", "nvidia/cuda:"),
                                             ("Dockerfile.denoiser", "python:3.11-slim")])
def test_dockerfiles_build_from_the_repository(dockerfile, base):
    text = (DEPLOY / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    image = re.search(r"^FROM (\S+)", text, re.M).group(1)
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    assert image.startswith(base)
    assert re.search(r'pip install "?\.', text)
    copied = set()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in source.split():
            assert (REPO / part).exists(), f"{dockerfile} copies {part}, which is not in the repository"
            copied.add(part)
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p.rstrip("*") for p in packages if p.rstrip("*") not in copied]
    assert missing == [], f"{dockerfile} installs the distribution without {missing}"
    assert entrypoint(dockerfile)[0] == "promptcast"

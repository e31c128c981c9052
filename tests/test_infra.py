"""infra/: the docker-compose stack and the Kubernetes work-pool base job template.

Fast, no network: the compose file is checked as YAML (plus `docker compose config` when the compose
plugin is installed), the job template as JSON rendered with Prefect's own templating.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; `$${VAR}` is an escaped literal
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
PLACEHOLDER_RE = re.compile(r"\{\{\s*([\w.\-]+)\s*\}\}")


# ----------------------------------------------------------------------------- compose helpers
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        v = service.get(key)
        if v is not None:
            parts.extend(v if isinstance(v, list) else [v])
    return " ".join(str(p) for p in parts)


def _resolve(text: str, env: dict[str, str]) -> str:
    """Compose-style interpolation with .env.example values (then defaults)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] != "" or op in (None, "-", "?")):
            return env[name]
        return arg if op in (":-", "-") else ""

    return VAR_RE.sub(sub, text).replace("$$", "$")


def _depends(service: dict) -> dict[str, str]:
    dep = service.get("depends_on", {})
    assert isinstance(dep, dict), "depends_on must be the long form (with conditions)"
    return {name: spec.get("condition") for name, spec in dep.items()}


# ----------------------------------------------------------------------------- compose tests
def test_compose_has_required_services_volumes_and_healthchecks(services, compose):
    required = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
    assert required <= set(services), f"missing services: {required - set(services)}"
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert "healthcheck" in services[name] and services[name]["healthcheck"].get("test"), name
    volumes = set(compose.get("volumes") or {})
    assert {"postgres-data", "minio-data"} <= volumes
    assert any(str(v).startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert any(str(v).startswith("minio-data:") for v in services["minio"]["volumes"])


def test_postgres_creates_both_databases(services):
    mounts = [str(v) for v in services["postgres"]["volumes"]]
    init = [m for m in mounts if ":/docker-entrypoint-initdb.d" in m]
    assert init, "no init script mounted into /docker-entrypoint-initdb.d"
    script = (INFRA / init[0].split(":")[0]).resolve()
    assert script.is_file(), script
    sql = script.read_text().lower()
    for db in ("mlflow", "prefect"):
        assert re.search(rf"create\s+database\s+{db}\b", sql), f"{script.name} does not create {db}"


def test_minio_init_creates_both_buckets(services, env_example):
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert _depends(init).get("minio") == "service_healthy"
    cmd = _resolve(_command(init), env_example)
    buckets = set(re.findall(r"mc mb (?:--ignore-existing |-p )*\S+?/([\w.\-]+)", cmd))
    assert {env_example["MLFLOW_ARTIFACT_BUCKET"], env_example["DVC_BUCKET"]} <= buckets, cmd


def test_mlflow_uses_postgres_and_s3_on_minio(services, env_example):
    mlflow = services["mlflow"]
    assert mlflow["image"].startswith("ghcr.io/mlflow/mlflow")
    env = _env(mlflow)
    cmd = _resolve(_command(mlflow) + " " + " ".join(env.values()), env_example)
    assert "mlflow server" in cmd
    assert re.search(r"--backend-store-uri\s+\S*", cmd)
    assert "postgresql://" in cmd and "@postgres:5432/mlflow" in cmd
    assert re.search(r"--artifacts-destination\s+s3://" + re.escape(env_example["MLFLOW_ARTIFACT_BUCKET"]), cmd)
    assert "psycopg2" in cmd and "boto3" in cmd, "mlflow image needs psycopg2 and boto3 installed"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env
    assert any(str(p).endswith(":5000") for p in mlflow["ports"])
    assert _depends(mlflow) == {"postgres": "service_healthy", "minio-init": "service_completed_successfully"}
    # MLflow 3 validates the Host header: the worker reaches it as mlflow:5000
    allowed = _resolve(env.get("MLFLOW_SERVER_ALLOWED_HOSTS", ""), env_example).split(",")
    assert "mlflow:*" in allowed or "mlflow:5000" in allowed or "*" in allowed


def test_prefect_server_uses_postgres_via_asyncpg(services, env_example):
    server = services["prefect-server"]
    assert server["image"].startswith("prefecthq/prefect:3")
    url = _resolve(_env(server)["PREFECT_API_DATABASE_CONNECTION_URL"], env_example)
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect"), url
    assert env_example["POSTGRES_PASSWORD"] in url
    assert any(str(p).endswith(":4200") for p in server["ports"])
    assert _depends(server) == {"postgres": "service_healthy"}


def test_worker_reserves_nvidia_gpus_and_points_at_servers(services, env_example):
    worker = services["prefect-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia"]
    assert gpu and "gpu" in gpu[0]["capabilities"]
    assert _resolve(str(gpu[0]["count"]), {}) == "all"  # ${GPUS_PER_WORKER:-all}
    assert "GPUS_PER_WORKER" in str(gpu[0]["count"])
    env = _env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    cmd = _resolve(_command(worker) + " " + " ".join(env.values()), env_example)
    assert "prefect worker start" in cmd and "--type process" in cmd
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert env_example["PAFT_WORK_POOL"] == pool, "worker pool must be the one prefect.yaml deploys to"
    assert "pip install" in cmd and "/opt/paft" in cmd
    assert any(str(v).split(":")[1:2] == ["/opt/paft"] for v in worker["volumes"]), worker["volumes"]
    deps = _depends(worker)
    assert deps["prefect-server"] == "service_healthy" and deps["mlflow"] == "service_healthy"


def test_training_workers_serve_the_gpu_pool_one_job_each_on_disjoint_gpus(services, env_example):
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    (gpu,) = [d for d in deployments if d["entrypoint"] == "flows.train:paft_train"]
    seen = []
    for name in ("train-worker-a", "train-worker-b"):
        worker = services[name]
        cmd = _resolve(_command(worker), env_example)
        assert f"--pool {gpu['work_pool']['name']}" in cmd and "--limit 1" in cmd and "--type process" in cmd
        env = _env(worker)
        assert env["PREFECT_API_URL"] == services["prefect-worker"]["environment"]["PREFECT_API_URL"]
        seen.append(set(_resolve(env["CUDA_VISIBLE_DEVICES"], env_example).split(",")))
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert not seen[0] & seen[1], seen  # a GPU belongs to one worker


def _strings(obj):
    """Every key and string value of the parsed file (comments are not interpolated by compose)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif obj is not None:
        yield str(obj)


def test_every_required_variable_is_in_env_example(compose, env_example):
    used = {}
    for m in VAR_RE.finditer("\n".join(_strings(compose))):
        used.setdefault(m.group(1), set()).add(m.group(2))
    required = {name for name, ops in used.items() if ops & {None, "?", ":?"}}
    assert required, "expected secrets without defaults"
    assert required <= set(env_example), f"missing from .env.example: {sorted(required - set(env_example))}"
    # the example documents the defaulted ones too
    assert set(used) <= set(env_example), f"undocumented: {sorted(set(used) - set(env_example))}"
    # and carries nothing the compose file does not read
    assert set(env_example) <= set(used), f"unused in compose: {sorted(set(env_example) - set(used))}"
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "POSTGRES_USER", "MINIO_ROOT_USER"):
        assert secret in required, f"{secret} must come from .env, not a default"
    assert len(env_example["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses passwords under 8 characters"


def test_every_env_example_line_has_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f".env.example: no comment above {line!r}"


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config_accepts_the_file():
    if not _docker_compose_available():
        pytest.skip("`docker compose` (the compose plugin) is not installed here")
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- k8s template
@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


def _placeholders(obj) -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(_placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_placeholders(v) for v in obj)) if obj else set()
    if isinstance(obj, str):
        return set(PLACEHOLDER_RE.findall(obj))
    return set()


def _defaults(template: dict) -> dict:
    return {k: copy.deepcopy(v["default"]) for k, v in template["variables"]["properties"].items() if "default" in v}


def _render(job_configuration: dict, values: dict) -> dict:
    """Prefect's own templating when installed; else whole-string placeholders -> values, unset keys dropped."""
    try:
        from prefect.utilities.templating import apply_values
    except ImportError:  # pragma: no cover - prefect is a dependency
        apply_values = None
    if apply_values is not None:
        return apply_values(copy.deepcopy(job_configuration), values)

    unset = object()

    def walk(obj):
        if isinstance(obj, dict):
            out = {k: walk(v) for k, v in obj.items()}
            return {k: v for k, v in out.items() if v is not unset}
        if isinstance(obj, list):
            return [x for x in (walk(v) for v in obj) if x is not unset]
        if isinstance(obj, str):
            names = PLACEHOLDER_RE.findall(obj)
            if not names:
                return obj
            m = PLACEHOLDER_RE.fullmatch(obj)
            if m:
                return values.get(m.group(1), unset)
            if any(n not in values for n in names):
                return unset
            return PLACEHOLDER_RE.sub(lambda mm: str(values[mm.group(1)]), obj)
        return obj

    return walk(job_configuration)


def test_k8s_template_shape_and_declared_placeholders(template):
    assert set(template) == {"job_configuration", "variables"}
    props = template["variables"]["properties"]
    for name in ("gpus", "node_selector", "tolerations", "image", "namespace", "env", "cpu_request", "memory_request"):
        assert name in props, name
    used = _placeholders(template["job_configuration"])
    assert used <= set(props), f"undeclared placeholders: {sorted(used - set(props))}"
    assert {"gpus", "node_selector", "tolerations", "image", "env"} <= used
    assert props["gpus"]["type"] == "integer" and props["gpus"]["default"] == 1
    assert props["node_selector"]["type"] == "object"
    assert props["tolerations"]["type"] == "array"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in props["tolerations"]["default"]
    manifest = template["job_configuration"]["job_manifest"]
    limits = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert PLACEHOLDER_RE.fullmatch(limits["nvidia.com/gpu"]).group(1) == "gpus"


def test_k8s_variables_schema_is_valid_and_defaults_conform(template):
    jsonschema = pytest.importorskip("jsonschema")
    schema = template["variables"]
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(_defaults(template), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpus": "four"}, schema)


def test_k8s_template_renders_a_gpu_job(template):
    values = _defaults(template) | {"gpus": 4, "image": "registry.example.com/paft:1", "name": "paft-run",
                                    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                    "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}
    config = _render(template["job_configuration"], values)
    job = config["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["generateName"] == "paft-run-"
    assert job["metadata"]["namespace"] == "default"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/paft:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {v["name"] for v in pod["volumes"]} == {"dshm"}
    # no placeholder survives, and unset optional variables leave no keys behind
    assert not _placeholders(config)
    assert "serviceAccountName" not in pod and "args" not in container


def test_k8s_template_defaults_alone_give_one_gpu(template):
    config = _render(template["job_configuration"], _defaults(template))
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_infra_docs_show_the_commands():
    k8s = (INFRA / "k8s" / "README.md").read_text()
    assert "prefect work-pool create paft-gpu --type kubernetes --base-job-template infra/k8s/base-job-template.json" in k8s
    dvc = (INFRA / "dvc-s3-remote.md").read_text()
    for line in ("dvc remote add -d s3store s3://paft-dvc", "dvc remote modify s3store endpointurl http://localhost:9000",
                 "dvc remote modify --local s3store", "dvc push"):
        assert line in dvc, line
    readme = (INFRA / "README.md").read_text()
    for line in ("cp .env.example .env", "docker compose -f infra/docker-compose.yml --env-file .env up -d",
                 "prefect deploy --all", "prefect deployment run paft/full"):
        assert line in readme, line

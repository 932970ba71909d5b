"""deploy/ (Kubernetes through dagster-k8s) checked without a cluster: the instance file through
Dagster's own schema, the classes it names against their config schemas, the Definitions under
VAS_EXECUTOR=k8s, the step Job a GPU asset would get (built by dagster-k8s's own code, offline),
and the Helm values, Dockerfile and manifests against the instance file. Nothing here reaches a
cluster, a registry or Postgres: deploy/README.md says what that leaves unchecked."""

from __future__ import annotations

import copy
import json
import re
import tomllib

import dagster as dg
import kubernetes.client as k8s
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.execution.api import create_execution_plan
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes.config_class import class_from_code_pointer
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from assets.k8s import GPU_K8S_CONFIG, K8S_CONFIG_TAG
from models.profiles import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
GPU_ASSETS = ("value_models", "rollout_shards", "rollouts")
STORAGES = {"run_storage": PostgresRunStorage, "event_log_storage": PostgresEventLogStorage,
            "schedule_storage": PostgresScheduleStorage}
PG_ENV = {"DAGSTER_PG_HOST": "postgres", "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "secret",
          "DAGSTER_PG_DB": "dagster"}
FAKE_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: offline, user: {token: offline}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
"""


def _raw_instance() -> dict:
    return yaml.safe_load((DEPLOY / "dagster.yaml").read_text())


def _values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def _validated_instance(tmp_path, raw: dict) -> dict:
    """raw as $DAGSTER_HOME/dagster.yaml through Dagster's instance loader (schema and all)."""
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(raw))
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    return config


def _check_class_config(section: dict) -> type:
    """The class a configurable-class section names, its config validated against its schema."""
    cls = class_from_code_pointer(section["module"], section["class"])
    result = validate_config(cls.config_type(), section.get("config") or {})
    if not result.success:
        raise DagsterInvalidConfigError(f"{section['class']} config", result.errors, section.get("config"))
    return cls


# --- the instance file -------------------------------------------------------------------------

def test_instance_file_passes_dagsters_own_instance_validation():
    config, custom_class = dagster_instance_config(str(DEPLOY))     # reads deploy/dagster.yaml
    assert custom_class is None
    assert config["telemetry"] == {"enabled": False}
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_named_classes_import_and_their_config_validates():
    raw = _raw_instance()
    assert _check_class_config(raw["run_launcher"]) is K8sRunLauncher
    coordinator = _check_class_config(raw["run_coordinator"])
    assert coordinator is dg.QueuedRunCoordinator
    for key, cls in STORAGES.items():
        assert _check_class_config(raw[key]) is cls, key


def test_no_sqlite_anywhere_and_every_storage_is_postgres():
    raw = _raw_instance()
    assert "sqlite" not in (DEPLOY / "dagster.yaml").read_text().lower().replace("no sqlite", "")
    # The unified `storage:` key would stand in for the three; Dagster's default for a missing one
    # is SQLite under DAGSTER_HOME, so all three must be set, to Postgres.
    assert "storage" not in raw
    for key in STORAGES:
        assert raw[key]["module"].startswith("dagster_postgres"), key
        db = raw[key]["config"]["postgres_db"]
        assert {k: db[k] for k in ("hostname", "username", "password", "db_name")} == {
            "hostname": {"env": "DAGSTER_PG_HOST"}, "username": {"env": "DAGSTER_PG_USER"},
            "password": {"env": "DAGSTER_PG_PASSWORD"}, "db_name": {"env": "DAGSTER_PG_DB"}}


def test_pools_are_the_single_machine_ones():
    local = yaml.safe_load((PROJECT_ROOT / "orchestration" / "dagster.yaml").read_text())
    assert _raw_instance()["concurrency"]["pools"] == local["concurrency"]["pools"]


def test_storage_config_resolves_from_the_environment(monkeypatch):
    """The env-var sources resolve into the Postgres storages' connection settings."""
    from dagster._config import process_config

    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    section = _raw_instance()["run_storage"]
    result = process_config(PostgresRunStorage.config_type(), section["config"])
    assert result.success, result.errors
    db = result.value["postgres_db"]
    assert (db["hostname"], db["username"], db["password"], db["db_name"], db["port"]) == \
        ("postgres", "dagster", "secret", "dagster", 5432)


@pytest.mark.parametrize("break_it", ["top_level_key", "launcher_key", "storage_key", "pool_granularity",
                                      "queue_conflict"])
def test_a_broken_instance_file_fails_validation(tmp_path, break_it):
    raw = copy.deepcopy(_raw_instance())
    _validated_instance(tmp_path, copy.deepcopy(raw))          # the unbroken one passes
    if break_it == "top_level_key":
        raw["run_storag"] = raw.pop("run_storage")
    elif break_it == "launcher_key":
        raw["run_launcher"]["config"]["service_acount_name"] = raw["run_launcher"]["config"].pop("service_account_name")
    elif break_it == "storage_key":
        raw["event_log_storage"]["config"]["postgres_db"]["hostnme"] = "postgres"
    elif break_it == "pool_granularity":
        raw["concurrency"]["pools"]["granularity"] = "step"
    else:   # a run limit in two places
        raw["run_coordinator"]["config"] = {"max_concurrent_runs": 2}
    with pytest.raises(DagsterInvalidConfigError):
        config = _validated_instance(tmp_path, raw)
        _check_class_config(config["run_launcher"])
        for key in STORAGES:
            if key in config:
                _check_class_config(config[key])


# --- the Definitions ---------------------------------------------------------------------------

def test_default_executor_is_unchanged(monkeypatch):
    from orchestration.definitions import build_defs

    monkeypatch.delenv("VAS_EXECUTOR", raising=False)
    job = build_defs().resolve_job_def("full_pipeline")
    assert job.executor_def is not k8s_job_executor
    assert job.executor_def.name == dg.multi_or_in_process_executor.name


def test_vas_executor_k8s_runs_every_job_on_k8s_job_executor(monkeypatch):
    from orchestration.definitions import build_defs

    monkeypatch.setenv("VAS_EXECUTOR", "k8s")
    defs = build_defs()
    for name in ("full_pipeline", "nightly_retrain", "incoming_retrain"):
        job = defs.resolve_job_def(name)
        assert job.executor_def is k8s_job_executor, name
    job = defs.resolve_job_def("full_pipeline")
    run_config = {"execution": {"config": {"job_namespace": "vas", "max_concurrent": 4,
                                           "step_k8s_config": {"container_config": {"resources": {
                                               "requests": {"cpu": "1"}}}}}}}
    assert dg.validate_run_config(job, run_config)["execution"]["k8s"]["max_concurrent"] == 4
    with pytest.raises(DagsterInvalidConfigError):
        dg.validate_run_config(job, {"execution": {"config": {"max_concurent": 4}}})


def test_an_unknown_executor_name_is_an_error(monkeypatch):
    from orchestration.definitions import executor_for

    with pytest.raises(ValueError, match="VAS_EXECUTOR"):
        executor_for("kubernetes")


def _step_tags(monkeypatch) -> dict[str, dict]:
    from orchestration.definitions import build_defs

    monkeypatch.setenv("VAS_EXECUTOR", "k8s")
    plan = create_execution_plan(build_defs().resolve_job_def("full_pipeline"))
    return {step.key: step.tags for step in plan.steps}


def test_gpu_assets_carry_the_tag_and_it_parses(monkeypatch):
    tags = _step_tags(monkeypatch)
    for name in GPU_ASSETS:
        assert json.loads(tags[name][K8S_CONFIG_TAG]) == GPU_K8S_CONFIG, name
        config = get_user_defined_k8s_config(tags[name])       # dagster-k8s validates the tag's schema
        assert config.container_config["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert config.pod_spec_config["node_selector"] and config.pod_spec_config["tolerations"]
    # Only those ask for a GPU; the others keep the run launcher's resources.
    assert [k for k, t in tags.items() if K8S_CONFIG_TAG in t] == [k for k in tags if k in GPU_ASSETS]


def test_a_misspelled_tag_fails_dagster_k8s_validation():
    bad = {K8S_CONFIG_TAG: json.dumps({"container_confg": GPU_K8S_CONFIG["container_config"]})}
    with pytest.raises(DagsterInvalidConfigError):
        get_user_defined_k8s_config(bad)


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """The run launcher deploy/dagster.yaml configures, built offline: only where it loads the
    cluster's credentials from is replaced, by a kubeconfig pointing nowhere (nothing is called)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    from dagster._config import process_config

    config = {**_raw_instance()["run_launcher"]["config"], "load_incluster_config": False,
              "kubeconfig_file": str(kubeconfig)}
    result = process_config(K8sRunLauncher.config_type(), config)
    assert result.success, result.errors
    return K8sRunLauncher.from_config_value(None, result.value)


def _step_job(launcher, tags: dict, step_key: str) -> k8s.V1Job:
    """The Job K8sStepHandler.launch_step would create for this step, by the same calls."""
    run = DagsterRun(job_name="full_pipeline", run_id="0" * 8 + "-0000-0000-0000-" + "0" * 12)
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    job_config = context.get_k8s_job_config("registry.example.com/vas-pipeline:0.1.0", launcher)
    return construct_dagster_k8s_job(job_config=job_config, args=["dagster", "api", "execute_step"],
                                     job_name=f"dagster-step-{step_key.replace('_', '-')}",
                                     component="step_worker", user_defined_k8s_config=context.run_k8s_config,
                                     env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": step_key}])


def test_step_jobs_get_the_gpu_the_data_volume_and_the_secrets(launcher, monkeypatch):
    tags = _step_tags(monkeypatch)
    for step_key in ("value_models", "rollouts", "evaluation"):
        job = _step_job(launcher, tags[step_key], step_key)
        pod = job.spec.template.spec
        container = pod.containers[0]
        limits = container.resources.limits or {}
        if step_key in GPU_ASSETS:
            assert str(limits["nvidia.com/gpu"]) == "1"
            assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
            assert [t.key for t in pod.tolerations] == ["nvidia.com/gpu"]
        else:
            assert "nvidia.com/gpu" not in limits and not pod.node_selector
        assert container.resources.requests["cpu"] == "1"          # the launcher's run_k8s_config
        assert {(m.name, m.mount_path) for m in container.volume_mounts} >= {("vas-data", "/opt/vas/data")}
        assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "vas-data"
                   for v in pod.volumes)
        assert {s.secret_ref.name for s in container.env_from if s.secret_ref} == {"vas-dvc-remote"}
        assert {s.config_map_ref.name for s in container.env_from if s.config_map_ref} >= {"vas-postgres"}
        env = {e.name: e for e in container.env}
        assert env["DAGSTER_PG_PASSWORD"].value_from.secret_key_ref.name == "dagster-postgresql-secret"
        assert env["VAS_EXECUTOR"].value == "k8s" and env["DAGSTER_DISABLE_TELEMETRY"].value == "1"
        assert pod.service_account_name == "dagster"
        # The whole Job is a valid Kubernetes object (dagster-k8s's strict model parser).
        manifest = k8s.ApiClient().sanitize_for_serialization(job)
        k8s_model_from_dict(k8s.V1Job, k8s_snake_case_dict(k8s.V1Job, manifest))


def test_a_misspelled_container_field_fails_to_build(launcher):
    bad = {K8S_CONFIG_TAG: json.dumps({"container_config": {"resorces": {"limits": {"nvidia.com/gpu": 1}}}})}
    with pytest.raises(Exception, match="resorces"):
        _step_job(launcher, bad, "value_models")


# --- Helm values, image and manifests ----------------------------------------------------------

def _image(values: dict) -> str:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def _dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    block = re.search(r"^ENV (.*?)(?:\n\n|\n[A-Z])", text, re.S | re.M).group(1)
    return dict(pair.split("=", 1) for pair in block.replace("\\\n", " ").split())


def test_helm_values_say_what_the_instance_file_says():
    values, launcher = _values(), _raw_instance()["run_launcher"]["config"]
    k8s_values = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["global"]["dagsterHome"] == launcher["dagster_home"]
    assert values["global"]["postgresqlSecretName"] == launcher["postgres_password_secret"]
    assert values["global"]["serviceAccountName"] == launcher["service_account_name"]
    assert k8s_values["jobNamespace"] == launcher["job_namespace"]
    assert k8s_values["envVars"] == launcher["env_vars"]
    assert [s["name"] for s in k8s_values["envSecrets"]] == launcher["env_secrets"]
    assert [c["name"] for c in k8s_values["envConfigMaps"]] == launcher["env_config_maps"]
    assert [k8s_snake_case_dict(k8s.V1Volume, v) for v in k8s_values["volumes"]] == \
        [k8s_snake_case_dict(k8s.V1Volume, v) for v in launcher["volumes"]]
    assert [k8s_snake_case_dict(k8s.V1VolumeMount, m) for m in k8s_values["volumeMounts"]] == \
        [k8s_snake_case_dict(k8s.V1VolumeMount, m) for m in launcher["volume_mounts"]]
    assert k8s_values["runK8sConfig"]["containerConfig"] == launcher["run_k8s_config"]["container_config"]
    # Postgres outside the chart, the same pools and run limit, a queue, telemetry off.
    assert values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlHost"]
    instance = _raw_instance()
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"] == {"granularity": instance["concurrency"]["pools"]["granularity"],
                                              "defaultLimit": instance["concurrency"]["pools"]["default_limit"]}
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["telemetry"]["enabled"] is False


def test_image_env_and_code_location_agree():
    values, launcher = _values(), _raw_instance()["run_launcher"]["config"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    image = _image(values)
    dockerfile = _dockerfile_env()
    launcher_env = dict(e.split("=", 1) for e in launcher["env_vars"])
    for name in ("DAGSTER_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS", "GX_ANALYTICS_ENABLED", "VAS_EXECUTOR"):
        assert dockerfile[name] == launcher_env[name] == deployment["env"][name], name
    assert dockerfile["DAGSTER_HOME"] == values["global"]["dagsterHome"]
    assert deployment["dagsterApiGrpcArgs"][:2] == ["-m", "orchestration.definitions"]
    assert tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"] == \
        "orchestration.definitions"
    # One image name: the build command in the Dockerfile and README, and the push job.
    assert f"-t {image} ." in (DEPLOY / "Dockerfile").read_text()
    assert f"-t {image} ." in (DEPLOY / "README.md").read_text()
    push = yaml.safe_load((DEPLOY / "dvc-push-job.yaml").read_text())
    assert push["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_dockerfile_installs_torch_first_then_the_k8s_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    torch, extra = text.index("torch==2.13.0"), text.index("'.[k8s]'")
    assert torch < extra
    pinned = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in pinned


def test_k8s_extra_is_the_matched_release_and_installed():
    from importlib.metadata import version

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"([\w-]+)==([\w.]+)", d).groups() for d in project["dependencies"] if "==" in d)
    extra = dict(re.match(r"([\w-]+)==([\w.]+)", d).groups() for d in project["optional-dependencies"]["k8s"])
    assert extra == {"dagster-k8s": pins["dagster-duckdb"], "dagster-postgres": pins["dagster-duckdb"]}
    dev_extras = [m.group(1).split(",") for d in project["optional-dependencies"]["dev"]
                  if (m := re.match(r"vas-pipeline\[([\w,]+)\]", d))]
    assert any("k8s" in extras for extras in dev_extras)
    for name, pinned in extra.items():
        assert version(name) == pinned


@pytest.mark.parametrize("manifest,model", [("vas-data-pvc.yaml", k8s.V1PersistentVolumeClaim),
                                            ("dvc-push-job.yaml", k8s.V1Job)])
def test_manifests_are_valid_kubernetes_objects(manifest, model):
    body = yaml.safe_load((DEPLOY / manifest).read_text())
    k8s_model_from_dict(model, k8s_snake_case_dict(model, body))


def test_the_data_volume_is_shared_read_write_by_every_node():
    pvc = yaml.safe_load((DEPLOY / "vas-data-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["name"] == _raw_instance()["run_launcher"]["config"]["volumes"][0][
        "persistentVolumeClaim"]["claimName"]


def test_entrypoint_is_a_valid_shell_script():
    import subprocess

    subprocess.run(["sh", "-n", str(DEPLOY / "entrypoint.sh")], check=True)

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.environment import set_env  # noqa: E402 - needs the project on sys.path

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
set_env(profile="smoke")    # every test runs on the smoke profile unless it says otherwise


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast alone and several times faster when other
    processes share the cores (OpenMP threads then wait on each other); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory):
    """The whole graph materialized once on the smoke profile into a fresh data folder."""
    import dagster as dg

    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS
    from orchestration.resources import VasSettings, build_resources

    data_dir = tmp_path_factory.mktemp("smoke-data")
    settings = VasSettings(profile="smoke", data_dir=str(data_dir), device="cpu")
    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=resources, instance=instance)
    return {"result": result, "settings": settings, "resources": resources, "instance": instance,
            "data_dir": data_dir}

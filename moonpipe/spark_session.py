"""The one way the pipeline gets a SparkSession.

Configuration comes from a profile in ``infra/spark/`` (``local`` by default, ``k8s-gpu`` for a
Kubernetes cluster with GPUs, or a path to any spark-defaults style file), then
``MOONPIPE_SPARK_CONF="k=v,k=v"``, then the caller's ``conf``. Under ``spark-submit`` the
submitted configuration wins and profiles are not applied: the job code is the same either way.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from moonpipe.settings import PROJECT_ROOT, Settings, local_path

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

PROFILE_DIR = PROJECT_ROOT / "infra" / "spark"


def profile_path(profile: str) -> Path:
    """The configuration file of ``profile``: a name in infra/spark/ or a path to a .conf file."""
    candidate = Path(profile)
    path = candidate if candidate.suffix == ".conf" else PROFILE_DIR / f"{profile}.conf"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.conf"))
        raise FileNotFoundError(
            f"Spark profile {profile!r} not found at {path}: use one of {known} "
            f"(MOONPIPE_SPARK_PROFILE) or the path of a spark-defaults style .conf file"
        )
    return path


def load_profile(profile: str) -> dict[str, str]:
    """Parse a spark-defaults file: ``key value`` per line, ``#`` comments."""
    conf: dict[str, str] = {}
    for number, raw in enumerate(profile_path(profile).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if not value.strip():
            raise ValueError(f"{profile_path(profile)}:{number}: expected 'key value', got {raw!r}")
        conf[key] = value.strip()
    return conf


def _env_overrides() -> dict[str, str]:
    text = os.environ.get("MOONPIPE_SPARK_CONF", "").strip()
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"MOONPIPE_SPARK_CONF item {item!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def resolve_conf(profile: str | None = None, conf: Mapping[str, str] | None = None) -> dict[str, str]:
    """The effective configuration for ``profile`` after env and caller overrides."""
    settings = Settings.from_env()
    resolved = load_profile(profile or settings.spark_profile)
    resolved.update(_env_overrides())
    resolved.update(conf or {})
    if resolved.get("spark.master", "").startswith("local"):
        resolved.setdefault("spark.local.dir", str(local_path(settings.tmp_dir) / "spark"))
    return resolved


def _require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return
    if shutil.which("java") is None:
        raise RuntimeError(
            "Java not found: Spark needs Java 17. Run `make setup` (it installs openjdk-17-jre-headless "
            "from apt) or set JAVA_HOME to a Java 17 installation."
        )


def _prepare_local_environment(conf: dict[str, str]) -> None:
    # Workers must run this interpreter (the project venv), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # A machine whose hostname resolves to an unreachable address makes local Spark hang.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    Path(conf["spark.local.dir"]).mkdir(parents=True, exist_ok=True)


def get_spark(
    profile: str | None = None, conf: Mapping[str, str] | None = None, app_name: str = "moonpipe"
) -> "SparkSession":
    """The active SparkSession, or a new one configured from ``profile`` (default: settings)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Launched by spark-submit: the submitted master and conf are already in force.
        return builder.getOrCreate()
    _require_java()
    resolved = resolve_conf(profile, conf)
    if resolved.get("spark.master", "").startswith("local"):
        _prepare_local_environment(resolved)
    for key, value in resolved.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def spark_submit_args(profile: str) -> list[str]:
    """Arguments that make spark-submit use ``profile`` (for the cluster-mode DAG tasks)."""
    return ["--properties-file", str(profile_path(profile))]

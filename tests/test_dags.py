"""The Airflow DAGs: they load cleanly and light, and real runs (dag.test, SQLite metadata, local
Spark, the real sample snapshots) produce the tables, rerun as no-ops and recover from a failure."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs.sample_catalog import build_sample_snapshots
from model.moon3_checkpoint import build_model, save_checkpoint
from model.moon3_config import Moon3Config
from moonpipe import delta
from moonpipe.settings import Settings

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
D1 = date(2026, 11, 1)
D2 = D1 + timedelta(days=1)
FASHION = 20
HEAVY_MODULES = ("pyspark", "torch", "transformers", "deltalake", "faiss", "great_expectations", "deepspeed")


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.models import DagBag

    return DagBag(str(DAGS_DIR))


def test_dags_import_without_errors_and_declare_ownership(dagbag):
    assert dagbag.import_errors == {}
    assert {"catalog_nightly", "creative_scoring"} <= set(dagbag.dags)
    for dag_id, dag in dagbag.dags.items():
        assert "moonpipe" in dag.tags, dag_id
        assert dag.max_active_runs == 1, dag_id
        for task in dag.tasks:
            assert task.owner == "data-platform", (dag_id, task.task_id)
            assert task.execution_timeout is not None, (dag_id, task.task_id)
            if task.task_type != "PythonSensor":
                assert task.retries >= 1, (dag_id, task.task_id)


def test_catalog_nightly_shape_and_params(dagbag):
    dag = dagbag.dags["catalog_nightly"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "wait_for_snapshot", "load_snapshot", "ingest", "embed", "build_index"
    ]
    assert set(dag.params.keys()) == {"date", "model_dir", "full_reembed"}
    assert all(t.depends_on_past for t in dag.tasks)  # backfills replay dates in order
    assert {a.name for a in dag.get_task("embed").outlets} == {"moonpipe.product_embeddings"}


def test_dag_files_import_nothing_heavy_at_module_level():
    code = (
        "import sys, runpy, pathlib\n"
        f"for f in sorted(pathlib.Path({str(DAGS_DIR)!r}).glob('*.py')):\n"
        "    runpy.run_path(str(f))\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = [line for line in result.stdout.splitlines() if line.startswith("HEAVY=")]
    assert heavy == ["HEAVY="], f"heavy imports at DAG parse time: {heavy}"


# -- real runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dag_home(tmp_path_factory, spark, airflow_db):
    """A lake of its own for the DAG runs; tasks read their locations from the environment."""
    home = tmp_path_factory.mktemp("dag-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOONPIPE_HOME", str(home))
        patch.setenv("MOONPIPE_MOON3_MODEL", str(home / "models" / "moon3" / "v1"))
        settings = Settings.from_env()
        build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, D1, days=2, fashion_items=FASHION)
        save_checkpoint(build_model(Moon3Config(seed=0)), settings.moon3_model)
        yield settings


def _run(dag, day: date, **conf):
    run = dag.test(logical_date=datetime(day.year, day.month, day.day, tzinfo=timezone.utc), run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    xcoms = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in run.get_task_instances() if str(ti.state) == "success"}
    return str(run.state), states, xcoms


def _table_rows(spark, settings: Settings, table: str, *columns: str) -> list[tuple]:
    return sorted(tuple(r) for r in delta.read(spark, settings.table_uri(table)).select(*columns).collect())


@pytest.fixture(scope="module")
def nightly_runs(dagbag, dag_home):
    dag = dagbag.dags["catalog_nightly"]
    return _run(dag, D1), _run(dag, D2)


def test_catalog_nightly_runs_two_days_into_the_tables(spark, dag_home, nightly_runs):
    (state1, tasks1, _), (state2, tasks2, xcoms2) = nightly_runs
    assert state1 == state2 == "success"
    assert set(tasks1.values()) == set(tasks2.values()) == {"success"}
    live = delta.read(spark, dag_home.table_uri("products")).where("NOT is_deleted").count()
    assert live == xcoms2["embed"]["live_products"]
    embeddings = delta.read(spark, dag_home.table_uri("product_embeddings")).count()
    assert embeddings == live  # every live product has exactly one vector for the model
    assert xcoms2["ingest"]["snapshot_date"] == D2.isoformat()
    assert 0 < xcoms2["embed"]["to_embed"] < live  # day 2 embeds only what changed
    assert xcoms2["load_snapshot"]["rows"] == xcoms2["ingest"]["rows_in"]
    index = xcoms2["build_index"]
    assert index["status"] == "published" and index["vector_count"] == live
    assert index["model_version"] == xcoms2["embed"]["model_version"] and index["current"] == index["index_version"]


def test_rerunning_a_date_is_a_no_op_on_the_data(spark, dagbag, dag_home, nightly_runs):
    before = {
        "products": _table_rows(spark, dag_home, "products", "product_id", "content_hash", "is_deleted"),
        "product_embeddings": _table_rows(spark, dag_home, "product_embeddings", "product_id", "content_hash"),
    }
    state, tasks, xcoms = _run(dagbag.dags["catalog_nightly"], D2)
    assert state == "success" and set(tasks.values()) == {"success"}
    assert xcoms["embed"]["to_embed"] == 0
    assert before["products"] == _table_rows(spark, dag_home, "products", "product_id", "content_hash", "is_deleted")
    assert before["product_embeddings"] == _table_rows(
        spark, dag_home, "product_embeddings", "product_id", "content_hash"
    )


def test_a_failed_embed_leaves_no_partial_output_and_a_retry_completes(spark, dagbag, dag_home, nightly_runs):
    dag = dagbag.dags["catalog_nightly"]
    for task in dag.tasks:
        task.retries = 0  # dag.test would otherwise wait out the retry delay
    emb_uri = dag_home.table_uri("product_embeddings")
    version_before = delta.version(emb_uri)
    state, tasks, _ = _run(dag, D2, full_reembed=True, model_dir=str(Path(dag_home.home) / "no-such-model"))
    assert state == "failed"
    assert tasks["embed"] == "failed" and tasks["ingest"] == "success"
    assert delta.version(emb_uri) == version_before  # nothing written by the failed task

    # Every Param given: dag.test keeps the previous run's conf in the in-memory DAG's params.
    state, tasks, xcoms = _run(dag, D2, full_reembed=True, model_dir=None)
    assert state == "success" and tasks["embed"] == "success", tasks
    assert xcoms["embed"]["embedded"] == xcoms["embed"]["live_products"]


@pytest.fixture(scope="module")
def creative_run(dagbag, dag_home, spark):
    from jobs.creative_data import build_creative_data
    from model.creative4u_checkpoint import build_model as build_creative4u
    from model.creative4u_checkpoint import save_checkpoint as save_creative4u
    from model.creative4u_config import Creative4UConfig

    save_creative4u(build_creative4u(Creative4UConfig(decoding="guided", guided_think_tokens=6)), dag_home.creative_model)
    data = build_creative_data(
        D1, dag_home, spark, vendure_products=2, fashion_products=1, creatives_per_product=4, mean_impressions=1100
    )
    return data, _run(dagbag.dags["creative_scoring"], D1)


def test_creative_scoring_scores_every_group_and_reports(spark, dag_home, creative_run):
    data, (state, tasks, xcoms) = creative_run
    assert state == "success" and set(tasks.values()) == {"success"}, tasks
    scored = xcoms["score_creatives"]
    scores = delta.read(spark, dag_home.table_uri("creative_scores")).collect()
    assert len(scores) == data.creatives * data.segments  # one score per creative and segment
    assert scored["scored"] == len(scores) and scored["groups_scored"] == data.products * data.segments
    judgments = delta.read(spark, dag_home.table_uri("creative_judgments")).count()
    assert judgments == scored["comparisons"] > 0
    assert xcoms["creative_report"]["winner_rows"] > 0 and Path(xcoms["creative_report"]["png"]).is_file()


MOON3_FAST = [
    "run.max_steps=2", "run.micro_batch=6", "run.warmup_steps=1", "run.checkpoint_every=1", "run.threads=2",
    "sft_warmup_steps=0", "grpo_every=1", "grpo_products=2", "grpo_group_size=2", "max_reasoning_tokens=6",
]
CREATIVE4U_FAST = [
    "run.max_steps=2", "run.micro_batch=2", "run.warmup_steps=1", "run.checkpoint_every=0", "run.threads=2",
    "sft_steps=1", "grpo_pairs=1", "grpo_group_size=2", "grpo_think_tokens=4", "heldout_fraction=0.5",
]


def test_retraining_trains_evaluates_and_gates_both_models(spark, dagbag, dag_home, creative_run):
    conf = {
        "export_args": ["--fashion-train-limit", "160", "--fashion-test-limit", "40"],
        "moon3_overrides": MOON3_FAST,
        "creative4u_overrides": CREATIVE4U_FAST,
        "evaluate_args": ["--gallery-limit", "160", "--query-limit", "40"],
        "margin": 0.0,
    }
    state, tasks, xcoms = _run(dagbag.dags["retraining"], D2, **conf)
    assert state == "success" and set(tasks.values()) == {"success"}, tasks
    assert xcoms["export_training_sets"]["fashion_mnist_products"] == 200
    for kind in ("moon3", "creative4u"):
        trained = xcoms[f"train_{kind}"]
        assert trained["steps"] == 2 and Path(trained["checkpoint_dir"]).is_dir()
        assert xcoms[f"evaluate_{kind}"]["candidate_version"] == trained["model_version"]
        decision = xcoms[f"promote_{kind}"]
        assert decision["model_version"] == trained["model_version"]
        assert decision["promoted"]  # the first candidate of a kind: nothing in production to beat
    rows = delta.read_arrow(dag_home.table_uri("model_registry")).to_pylist()
    assert {(r["model_name"], r["model_version"]) for r in rows if r["is_production"]} == {
        (kind, xcoms[f"train_{kind}"]["model_version"]) for kind in ("moon3", "creative4u")
    }

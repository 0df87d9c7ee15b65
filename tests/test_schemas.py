"""Table contracts: every schema derives from one definition, and violations say what to fix."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from schemas import TABLES, ContractViolation, contract, tables_markdown
from schemas.contract import Column, TableContract, arrow_type

ROOT = Path(__file__).resolve().parent.parent

REQUIRED_TABLES = {
    "catalog_snapshot", "catalog_snapshots", "products", "quarantine", "product_embeddings", "index_versions",
    "creatives", "user_segments", "creative_judgments", "creative_scores", "interactions", "model_registry",
}


def test_every_table_of_the_design_has_a_contract():
    assert REQUIRED_TABLES <= set(TABLES)  # areas may add their own tables (e.g. training sets)


@pytest.mark.parametrize("name", sorted(REQUIRED_TABLES))
def test_arrow_and_spark_schemas_derive_from_the_contract(name):
    table = contract(name)
    arrow = table.arrow_schema()
    spark = table.spark_schema()
    assert arrow.names == spark.fieldNames() == table.column_names
    for col, arrow_field, spark_field in zip(table.columns, arrow, spark.fields):
        assert arrow_field.nullable == spark_field.nullable == col.nullable
        assert col.doc, f"{name}.{col.name} has no documentation"
    for key in table.key:
        assert not table.column(key).nullable


def test_embeddings_contract_carries_vector_dimension_and_model_version():
    table = contract("product_embeddings")
    assert table.key == ("product_id", "model_version")
    assert arrow_type(table.column("embedding").dtype) == pa.list_(pa.field("element", pa.float32()))
    assert table.column("embedding_dim").dtype == "int32"
    assert table.column("attributes").dtype == "map<string,string>"


def test_docs_tables_md_is_generated_from_the_contracts():
    committed = (ROOT / "docs" / "tables.md").read_text()
    assert committed == tables_markdown(), "docs/tables.md is stale: run `make docs`"


def test_check_schema_reports_every_problem_with_table_and_column():
    products = contract("products")
    schema = products.arrow_schema().remove(0).set(
        products.arrow_schema().get_field_index("price") - 1, pa.field("price", pa.string())
    )
    with pytest.raises(ContractViolation) as caught:
        products.check_schema(schema)
    message = str(caught.value)
    assert message.startswith("table 'products' contract violated:")
    assert "column 'product_id' is missing (expected string)" in message
    assert "column 'price': expected float64 (double), got string" in message


def test_check_batch_rejects_nulls_in_non_nullable_columns():
    segments = contract("user_segments")
    data = segments.empty_arrow().to_pylist() + [
        {"segment_id": None, "name": "runners", "interest_queries": ["trail shoes"], "updated_date": None}
    ]
    loose = pa.schema([f.with_nullable(True) for f in segments.arrow_schema()])
    batch = pa.Table.from_pylist(data, schema=loose)
    with pytest.raises(ContractViolation) as caught:
        segments.check_batch(batch)
    assert "column 'segment_id' is non-nullable but has 1 null value(s)" in str(caught.value)
    assert "column 'updated_date' is non-nullable" in str(caught.value)


def test_conform_accepts_equivalent_types_and_keeps_extra_columns():
    table = TableContract(
        name="t", doc="", columns=(Column("id", "string", nullable=False), Column("n", "int64"))
    )
    data = pa.table({"extra": [1.5], "n": pa.array([3], pa.int64()), "id": pa.array(["a"], pa.large_string())})
    out = table.conform(data)
    assert out.column_names == ["id", "n", "extra"]  # contract order, additive column kept
    assert out.schema.field("id").type == pa.string()
    assert out.to_pylist() == [{"id": "a", "n": 3, "extra": 1.5}]


def test_bad_definitions_fail_at_import_time():
    with pytest.raises(ValueError, match="unknown column type 'strng'"):
        Column("x", "strng")
    with pytest.raises(ValueError, match="key column 'id' must be non-nullable"):
        TableContract(name="t", doc="", columns=(Column("id", "string"),), key=("id",))
    with pytest.raises(ValueError, match="partition_by names unknown columns"):
        TableContract(name="t", doc="", columns=(Column("id", "string"),), partition_by=("day",))
    with pytest.raises(KeyError, match="no table named 'prodcts'; known tables"):
        contract("prodcts")

"""Table contracts: one definition per table, from which the Arrow schema, the Spark schema,
the Delta schema and write-time validation all derive.

Column types are written as short strings (``"string"``, ``"array<float32>"``,
``"map<string,string>"``) so that a contract reads like the table's documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # pyspark is heavy; only the spark_* helpers import it, lazily.
    from pyspark.sql.types import DataType, StructType


class ContractViolation(ValueError):
    """Data or a schema does not match a table's contract."""


_PRIMITIVES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "binary": pa.binary(),
    "date": pa.date32(),
    # Delta stores timestamps as microseconds adjusted to UTC; a tz-aware type keeps the
    # table readable by delta-spark without the timestampNtz table feature.
    "timestamp": pa.timestamp("us", tz="UTC"),
}

# Arrow types that carry the same values as a contract type (Spark and pandas produce them).
_EQUIVALENT: dict[pa.DataType, pa.DataType] = {
    pa.large_string(): pa.string(),
    pa.string_view(): pa.string(),
    pa.large_binary(): pa.binary(),
    pa.binary_view(): pa.binary(),
}


def arrow_type(dtype: str) -> pa.DataType:
    """Arrow type of a contract type string."""
    text = dtype.replace(" ", "")
    if text in _PRIMITIVES:
        return _PRIMITIVES[text]
    if text.startswith("array<") and text.endswith(">"):
        return pa.list_(pa.field("element", arrow_type(text[6:-1])))
    if text.startswith("map<") and text.endswith(">"):
        key, _, value = text[4:-1].partition(",")
        return pa.map_(arrow_type(key), arrow_type(value))
    raise ValueError(
        f"unknown column type {dtype!r}: use one of {sorted(_PRIMITIVES)}, array<T> or map<K,V>"
    )


def _normalise(arrow: pa.DataType) -> pa.DataType:
    """Map Arrow variants that hold the same values onto the contract's canonical type."""
    if arrow in _EQUIVALENT:
        return _EQUIVALENT[arrow]
    if pa.types.is_timestamp(arrow):
        # Spark gives session-timezone timestamps; any tz-aware microsecond value is a UTC instant.
        return pa.timestamp("us", tz="UTC") if arrow.tz is not None else arrow
    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow) or pa.types.is_fixed_size_list(arrow):
        return pa.list_(pa.field("element", _normalise(arrow.value_type)))
    if pa.types.is_map(arrow):
        return pa.map_(_normalise(arrow.key_type), _normalise(arrow.item_type))
    return arrow


def spark_type(dtype: str) -> "DataType":
    """Spark SQL type of a contract type string."""
    from pyspark.sql.pandas.types import from_arrow_type

    return from_arrow_type(arrow_type(dtype))


@dataclass(frozen=True)
class Column:
    """One column of a table: its name, type string, whether nulls are allowed, and what it means."""

    name: str
    dtype: str
    nullable: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        arrow_type(self.dtype)  # fail at definition time on a typo in a type string

    @property
    def arrow(self) -> pa.Field:
        return pa.field(self.name, arrow_type(self.dtype), nullable=self.nullable)


@dataclass(frozen=True)
class TableContract:
    """A table's columns, merge key, partitioning and purpose.

    ``key`` is the set of columns that identify a row (used by MERGE); ``partition_by`` the
    Delta partition columns. Extra columns in written data are allowed (additive evolution);
    missing columns, type changes and nulls in non-nullable columns are violations.
    """

    name: str
    doc: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    partition_by: tuple[str, ...] = ()
    is_delta_table: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Rows per Parquet row group in the files written (None: the writer's default, ~1M rows). Tables
    # of images or vectors keep it small: a scan of one file then splits across tasks, and a reader
    # never decodes a column chunk of hundreds of MB at once (a churn-sized embed run scanned its
    # products 5x faster with 1,024-row groups than with one 108 MB group).
    row_group_rows: int | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"table {self.name!r}: duplicated columns {sorted(duplicated)}")
        for group, cols in (("key", self.key), ("partition_by", self.partition_by)):
            unknown = set(cols) - set(names)
            if unknown:
                raise ValueError(f"table {self.name!r}: {group} names unknown columns {sorted(unknown)}")
        for key_col in self.key:
            if self.column(key_col).nullable:
                raise ValueError(f"table {self.name!r}: key column {key_col!r} must be non-nullable")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name!r} has no column {name!r}; columns: {self.column_names}")

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.arrow for c in self.columns])

    def spark_schema(self) -> "StructType":
        from pyspark.sql.types import StructField, StructType

        return StructType(
            [StructField(c.name, spark_type(c.dtype), nullable=c.nullable) for c in self.columns]
        )

    def empty_arrow(self) -> pa.Table:
        return self.arrow_schema().empty_table()

    # -- validation -------------------------------------------------------------------------

    def check_schema(self, schema: pa.Schema) -> None:
        """Raise ContractViolation if ``schema`` lacks a contract column or changes its type."""
        problems = []
        for col in self.columns:
            index = schema.get_field_index(col.name)
            if index < 0:
                problems.append(f"column {col.name!r} is missing (expected {col.dtype})")
                continue
            got = _normalise(schema.field(index).type)
            want = arrow_type(col.dtype)
            if got != want:
                problems.append(f"column {col.name!r}: expected {col.dtype} ({want}), got {got}")
        if problems:
            raise ContractViolation(self._message(problems))

    def check_spark_schema(self, schema: "StructType") -> None:
        """Like check_schema, for a Spark DataFrame's schema (checked on the driver, before work starts)."""
        from pyspark.sql.pandas.types import to_arrow_schema

        try:
            arrow = to_arrow_schema(schema)
        except TypeError as err:  # a Spark type with no Arrow counterpart
            raise ContractViolation(self._message([f"schema cannot be converted to Arrow: {err}"])) from err
        self.check_schema(arrow)

    def check_batch(self, data: pa.Table | pa.RecordBatch) -> None:
        """Schema check plus the value rules: no nulls where the contract forbids them."""
        self.check_schema(data.schema)
        problems = []
        for col in self.columns:
            if not col.nullable:
                nulls = data.column(col.name).null_count
                if nulls:
                    problems.append(f"column {col.name!r} is non-nullable but has {nulls} null value(s)")
        if problems:
            raise ContractViolation(self._message(problems))

    def conform(self, data: pa.Table | pa.RecordBatch) -> pa.Table:
        """Check ``data`` and return it with contract columns first, in contract types.

        Extra columns are kept after the contract's (additive evolution).
        """
        self.check_batch(data)
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        arrays, fields = [], []
        for col in self.columns:
            arrays.append(table.column(col.name).cast(arrow_type(col.dtype)))
            fields.append(col.arrow)
        for extra in table.schema:
            if extra.name not in self.column_names:
                arrays.append(table.column(extra.name))
                fields.append(extra)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def _message(self, problems: list[str]) -> str:
        listed = "; ".join(problems)
        return (
            f"table {self.name!r} contract violated: {listed}. "
            f"Fix the writer to produce the contract's columns and types "
            f"(see schemas/tables.py, table {self.name!r}), or change the contract there."
        )

    def describe(self) -> str:
        """Markdown section documenting this table (used to generate docs/tables.md)."""
        lines = [f"## `{self.name}`", "", self.doc, ""]
        facts = []
        if self.key:
            facts.append(f"key: `{', '.join(self.key)}`")
        if self.partition_by:
            facts.append(f"partitioned by: `{', '.join(self.partition_by)}`")
        facts.append("Delta table" if self.is_delta_table else "input format (files, not a Delta table)")
        if self.row_group_rows and self.is_delta_table:
            facts.append(f"Parquet row groups of at most {self.row_group_rows:,} rows")
        lines += [" · ".join(facts), "", "| column | type | nulls | meaning |", "|---|---|---|---|"]
        for col in self.columns:
            nulls = "yes" if col.nullable else "no"
            lines.append(f"| `{col.name}` | `{col.dtype}` | {nulls} | {col.doc} |")
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"

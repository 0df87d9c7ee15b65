"""Table contracts: the single definition of every table's columns, key and partitioning."""

from schemas.contract import Column, ContractViolation, TableContract
from schemas.tables import TABLES, contract, tables_markdown

__all__ = ["Column", "ContractViolation", "TableContract", "TABLES", "contract", "tables_markdown"]

"""Report: summary.json, CSV tables, PNG figures and a self-contained index.html."""

from sparcom_jax.report.export import export_sets, set_records
from sparcom_jax.report.io import atomic_write, write_csv, write_json
from sparcom_jax.report.writer import write_report

__all__ = ["atomic_write", "export_sets", "set_records", "write_csv", "write_json", "write_report"]

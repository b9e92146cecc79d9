"""The HTML report of a run folder: `grpo report RUN_DIR`, also refreshed by the trainer."""

from grpo.report.html import REPORT_NAME, build_report, write_report

__all__ = ["REPORT_NAME", "build_report", "write_report"]

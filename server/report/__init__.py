"""The study report: one self-contained HTML file (figures embedded) for clinicians and auditors."""

from server.report.html import Section, build_report

__all__ = ["Section", "build_report"]

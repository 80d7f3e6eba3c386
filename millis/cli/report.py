"""`millis report`: an artifact's report.json as one self-contained HTML page (millis.optimize.report_html)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from millis.artifact.store import UNHASHED
from millis.cli.artifact import ARTIFACT_HELP
from millis.cli.flags import Command, Given, check_out_file
from millis.common.config import flag


@dataclass(frozen=True)
class ReportFlags:
    artifact: str = flag(help=ARTIFACT_HELP)
    out: str = flag("", "where to write the HTML page (default: ARTIFACT/report.html)", scoped=True)


def report_flags(given: Given) -> ReportFlags:
    a = given.build(ReportFlags)
    if a.out:  # write_html_report makes the missing directories; ARTIFACT/report.html is its default
        check_out_file(a.out, "--out", make_parents=True, allowed=(Path(a.artifact) / UNHASHED,))
    return a


def run(a: ReportFlags) -> int:
    from millis.optimize.report_html import write_html_report

    print(f"report: {write_html_report(a.artifact, a.out or None)}")
    return 0


COMMAND = Command("report", "write an artifact's report as one self-contained HTML page (tables and charts)",
                  lambda: (ReportFlags,), report_flags, run, positionals=("artifact",))

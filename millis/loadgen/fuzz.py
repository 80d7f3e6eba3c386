"""Fuzz a running `millis serve` from its own /openapi.json with schemathesis (a test extra).

Every generated request (schema-valid ones and mutated, invalid ones) must get no 5xx, a status and
content type the spec lists, and a body that matches the spec's response schema; invalid data must
be refused with a 4xx. `positive=True` also requires every schema-valid request to succeed, which
holds for the encoder (its spec bounds everything it checks) but not for generation, where a text
prompt's token count is only known after tokenizing.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection")
# a request refused for what the schema forbids may say so with any of these
REJECTED = (400, 404, 405, 413, 422)


@dataclass(frozen=True)
class FuzzResult:
    ok: bool
    generated: int       # test cases (requests) schemathesis generated and sent
    failures: int        # unique failures it found
    output: str          # its report, for the reader of a failed test


def fuzz(url: str, workdir: Path, max_examples: int, seed: int, positive: bool = False,
         timeout_s: float = 900) -> FuzzResult:
    """Run schemathesis (phases coverage + fuzzing, one worker) against url's /openapi.json."""
    exe = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if exe is None:
        raise RuntimeError("schemathesis is not installed: pip install -e '.[test]'")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = {list(REJECTED)}\n")
    checks = CHECKS + (("positive_data_acceptance",) if positive else ())
    cmd = [exe, "--config-file", str(config), "run", f"{url.rstrip('/')}/openapi.json", "--checks", ",".join(checks),
           "-n", str(max_examples), "--seed", str(seed), "-w", "1", "--phases", "coverage,fuzzing", "--no-color",
           "--generation-database", "none", "--request-timeout", "30", "--max-failures", "20"]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout_s)
    out = p.stdout + p.stderr
    gen = re.search(r"(\d+) generated", out)
    found = re.search(r"(\d+) unique failures?", out)
    return FuzzResult(p.returncode == 0, int(gen.group(1)) if gen else 0, int(found.group(1)) if found else 0, out)

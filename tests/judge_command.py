"""A judge command for ``tests/test_grading_judge.py`` (``--judge-command "python tests/judge_command.py MODE"``):
reads the envelope JSON on stdin and the rules' grade from ``TRACE_SOURCE_RULES_GRADE``, prints a verdict JSON.

MODE: ``failed`` (a verdict naming the trace id and the rules' verdict, with usage), ``garbage`` (not JSON), ``exit``
(writes to stderr, exits 3), ``slow`` (sleeps 60 s first).
"""

import json
import os
import sys
import time

mode = sys.argv[1]
envelope = json.loads(sys.stdin.read())
rules = json.loads(os.environ["TRACE_SOURCE_RULES_GRADE"])
if mode == "garbage":
    print("the run looks bad to me")
elif mode == "exit":
    print("judge crashed: no model configured", file=sys.stderr)
    sys.exit(3)
else:
    if mode == "slow":
        time.sleep(60)
    spans = envelope["spans"]
    print(json.dumps({
        "verdict": "failed", "category": "wrong_output",
        "summary": f"trace {envelope['trace_id']}: the rules said {rules['verdict']}",
        "evidence": [{"span_id": spans[0]["span_id"] if spans else "", "quote": "judged by the command"}],
        "criteria": [], "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}))

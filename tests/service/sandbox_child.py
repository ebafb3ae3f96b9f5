"""A sandbox child that misbehaves on request (`python -m tests.service.sandbox_child`), standing in
for one that ran hostile code: whatever it answers, the pool must turn it into a SandboxError."""

from __future__ import annotations

import json
import os
import sys
import time

ANSWERS = {"garbage": b"not json\n", "list": b"[]\n", "bad-failure": b'{"failure": {"code": ["x"]}}\n'}


def main() -> None:
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        do = json.loads(line)["do"]
        if do == "exit":
            os._exit(3)
        if do == "sleep":
            time.sleep(60)
        out.write(ANSWERS.get(do) or json.dumps({"pid": os.getpid()}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()

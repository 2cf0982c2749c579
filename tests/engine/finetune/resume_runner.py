"""Runs one finetune in its own process, for the resume tests: `python resume_runner.py CONFIG.json [STEP SIGNAL]`.

With STEP and SIGNAL, the process sends itself that real signal (KILL or TERM) as soon as it has logged the train
row of STEP: a kill at a known point between two saves, with nothing in the engine told about it."""
import json
import os
import signal
import sys

from engine.finetune import FinetuneConfig, finetune
from engine.finetune import outputs

if len(sys.argv) > 3:
    die_at, sig = int(sys.argv[2]), getattr(signal, "SIG" + sys.argv[3])
    write = outputs.TrainLog.write

    def write_then_die(self, step, event, **fields):
        row = write(self, step, event, **fields)
        if event == "train" and step == die_at:
            os.kill(os.getpid(), sig)
        return row

    outputs.TrainLog.write = write_then_die
finetune(FinetuneConfig(**json.loads(open(sys.argv[1]).read())))

"""A test-only Lightning callback that records where a job ran (to test sweep launchers)."""

import json
import os
import socket
from pathlib import Path

import lightning as L


class RecordJob(L.Callback):
    """Writes job.json (pid, ppid, session id, CUDA_VISIBLE_DEVICES, hostname) into the run's
    output directory when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        record = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "sid": os.getsid(0),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "hostname": socket.gethostname(),
        }
        (Path(trainer.default_root_dir) / "job.json").write_text(json.dumps(record))

"""Read an offline W&B run back: wandb 0.31 ships no Python reader, so `_wandb_records` decodes
the `.wandb` format (a LevelDB-style log of `wandb_internal_pb2.Record` protobufs) itself,
checksums included."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # ident, magic, version
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: 7-byte chunk headers (crc32, length, type) in 32 KiB
    blocks, a record split over blocks as FIRST, MIDDLE..., LAST chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data.startswith(_HEADER), data[:7]
    records, parts, pos = [], [], len(_HEADER)
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zeros: the end of what was written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos} of {path}"
        pos += 7 + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _set(config: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(job: Path) -> tuple:
    """(the run record, the config as logged) of the one offline W&B run in a job directory."""
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config: dict = {}
    for item in run.config.update:
        _set(config, item)
    for record in records:  # log_hyperparams: config updates after wandb.init
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                _set(config, item)
    return run, config


def read_offline_summary(run_file: Path) -> dict:
    """The summary of an offline W&B run (`.../offline-run-*/run-*.wandb`): its summary
    updates, in order (a nested key as its parts joined by "/")."""
    summary: dict = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def history_keys(run_file: Path) -> set[str]:
    """The keys logged to the history of an offline W&B run (`wandb.log`, Lightning's metrics)."""
    keys = set()
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def history(run_file: Path) -> dict[tuple[str, int], float]:
    """{(metric, trainer/global_step): value} of an offline W&B run's history (Lightning logs
    each metric with the step as `trainer/global_step`)."""
    values = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = row.pop("trainer/global_step")
            values.update({(k, step): v for k, v in row.items() if not k.startswith("_")})
    return values

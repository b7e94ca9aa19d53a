"""Tests for jaxeff.train.metrics: JSON lines, TensorBoard events, process-0 writing."""

import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxeff.train import MetricWriter, progress_bar, read_metrics, to_python_scalars


def read_tensorboard_scalars(logdir):
    """{tag: [(step, value), ...]} from the TFRecord event files under ``logdir``."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_write_and_read_back_json_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": jnp.float32(0.5), "grad_norm": np.float64(2.25), "lr": 1e-3})
        writer.write(
            jnp.asarray(2),
            {
                "loss": jnp.asarray(0.25),
                "finite": jnp.asarray(True),
                "count": np.int32(7),
                "phase": "mh",
            },
        )
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["grad_norm"] == 2.25 and rows[0]["lr"] == 1e-3
    assert rows[1] == {
        "step": 2,
        "time": rows[1]["time"],
        "loss": 0.25,
        "finite": True,
        "count": 7,
        "phase": "mh",
    }
    assert rows[0]["time"] <= rows[1]["time"]
    assert read_metrics(tmp_path / "metrics.jsonl") == rows

    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["grad_norm"] == [(1, 2.25)]
    assert scalars["count"] == [(2, 7.0)]
    assert "phase" not in scalars


def test_appends_on_resume_and_skips_truncated_last_line(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("\n")
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": float("nan")})
    with pytest.raises(json.JSONDecodeError):  # corruption in the middle is an error
        read_metrics(tmp_path)


def test_nan_round_trips():
    values = to_python_scalars({"loss": jnp.float32(np.nan), "n": jnp.int32(3)})
    assert np.isnan(values["loss"]) and values["n"] == 3 and isinstance(values["n"], int)


def test_rejects_non_scalar_and_reserved_keys(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match=r"metrics\['emb'\]"):
            writer.write(0, {"emb": jnp.ones(3)})
        with pytest.raises(ValueError, match="reserved key 'step'"):
            writer.write(0, {"step": 3})
        with pytest.raises(TypeError, match="metrics"):
            writer.write(0, [1.0])
    with pytest.raises(RuntimeError, match="close"):
        writer.write(1, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="path"):
        read_metrics(tmp_path / "missing")


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricWriter(tmp_path / "run") as writer:
        writer.write(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "run")
    assert progress_bar(10).disable


def test_progress_bar_starts_at_resumed_step():
    bar = progress_bar(100, initial=40, desc="train", disable=False, file=io.StringIO())
    bar.set_postfix(loss="0.1234", refresh=False)
    bar.update()
    assert (bar.n, bar.total) == (41, 100)
    assert bar.postfix == "loss=0.1234"
    bar.close()
    with pytest.raises(ValueError, match="total"):
        progress_bar(-1)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_prints_whole_lines_where_output_is_not_a_terminal():
    out = io.StringIO()
    with progress_bar(5000, desc="train", disable=False, file=out) as bar:
        for step in range(5000):
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
            bar.update()
        bar.write("a status line", file=out)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # The loop outlasts no 30 s interval: the opening line, the status line, the final one.
    assert len(lines) == 3, lines
    assert lines[0].startswith("train:   0%") and "0/5000" in lines[0]
    assert lines[1] == "a status line"
    assert "5000/5000" in lines[-1] and "loss=0.0002" in lines[-1] and text.endswith("\n")

    out = io.StringIO()
    with progress_bar(50, disable=False, file=out, mininterval=0, miniters=10) as bar:
        for _ in range(50):
            bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split("|")[-1].split()[0] for line in lines] == [
        f"{n}/50" for n in range(0, 51, 10)
    ]


def test_progress_bar_on_a_terminal_is_tqdms_own():
    out = _Terminal()
    with progress_bar(100, disable=False, file=out, mininterval=0) as bar:
        bar.update(100)
    assert "\r" in out.getvalue()

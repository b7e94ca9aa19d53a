"""VSE++ on a real 2-process cluster on localhost against one process, through the launcher.

The tiny shapes run of tests/test_vsepp_faults.py is trained as 2 processes × 4 CPU devices
(``python -m experiments.launch.local``, gloo) and as 1 process × 8 devices, at the same
global batch. Checked: the same training (losses per step, final parameters), the
evaluation split over the processes and equal to a single-process evaluation bit for bit,
the test numbers, and that only process 0 writes files and no process reads a file that
process 0 wrote (every file each process opens is recorded with Python's audit hooks).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from experiments.vsepp import evaluate, train
from jaxeff import retrieval
from jaxeff import train as jt
from jaxeff.data import eval_caption_batches, eval_image_batches, generate_shapes
from jaxeff.data.vocab import build_vocabulary
from jaxeff.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 8
CONFIG = """
from experiments.vsepp.configs import shapes


def get_config():
    config = shapes.get_config()
    config.data.train_families = 16
    config.data.dev_families = 4
    config.data.test_families = 4
    config.data.data_dir = {data_dir!r}
    config.batch_size = 32
    config.model.cnn_features = (8, 16)
    config.model.word_dim = 16
    config.model.embed_size = 32
    config.num_steps = {num_steps}
    config.loss.warmup_steps = 4
    config.lr_decay_fraction = 0.5
    config.learning_rate = 1e-3
    config.log_every = 1
    config.eval_every = {num_steps}
    config.checkpoint_every = {num_steps}
    config.eval_batch_size = 16  # 2 batches of 8 + 8 dev images: both processes embed
    return config
"""

#: Installed as ``sitecustomize`` in the processes under test: records every file each
#: process opens (mode or flags, path), renames, creates or removes, one file per process.
FILE_AUDIT = textwrap.dedent(
    """
    import os, sys

    _prefix = os.environ.get("JAXEFF_TEST_FILE_LOG")
    if _prefix:
        _log = open(f"{_prefix}.{os.environ.get('JAXEFF_PROCESS_ID', 'single')}", "a",
                    buffering=1)

        def _record(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                path, mode, flags = args
                write = (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                _log.write(f"{'write' if write else 'read'}\\t{os.fsdecode(path)}\\n")
            elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
                _log.write(f"write\\t{os.fsdecode(args[0])}\\n")

        sys.addaudithook(_record)
    """
)

#: Seconds a cluster run may take: about 40 s on an idle 2-core machine (mostly imports
#: and compiles, in both processes at once); slow CI runners get a wide margin.
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    config = root / "tiny.py"
    config.write_text(CONFIG.format(data_dir=str(root / "tfds"), num_steps=NUM_STEPS))
    (root / "audit").mkdir()
    (root / "audit" / "sitecustomize.py").write_text(FILE_AUDIT)
    return root, str(config)


def start(command, root, name, *, processes=None):
    """Starts ``command`` in the repository (through the launcher with ``processes``), its
    file accesses recorded under ``root/files/name``; returns ``(process, log folder)``."""
    logs = root / "logs" / name
    logs.mkdir(parents=True)
    (root / "files").mkdir(exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root / "audit"), ROOT]),
        JAXEFF_TEST_FILE_LOG=str(root / "files" / name),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    if processes is not None:
        launcher = [sys.executable, "-m", "experiments.launch.local"]
        launcher += ["--num_processes", str(processes), "--cpu_devices", str(8 // processes)]
        command = [*launcher, "--log_dir", str(logs), "--grace_seconds", "5", "--", *command]
    with open(logs / "launcher.out", "w") as out, open(logs / "launcher.err", "w") as err:
        # A session of its own, so that the whole group can be killed at the end.
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
        )
    return proc, logs


def kill(started):
    """Kills every process group ``start`` created (each command and its children)."""
    for proc, _ in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def finish(*started):
    """Waits for the started commands; fails with their output unless all exit 0 within
    :data:`RUN_TIMEOUT_S`. Nothing they started outlives the call."""
    codes = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for proc, _ in started:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        kill(started)
    for code, (_, logs) in zip(codes, started, strict=True):
        if code != 0:
            report = "\n".join(
                f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.iterdir())
            )
            pytest.fail(f"{logs.name}: exit code {code} (None: still running)\n{report}")
    return [logs for _, logs in started]


def accesses(root, name, process):
    """``(kind, path)`` of every file access the process recorded."""
    path = root / "files" / f"{name}.{process}"
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines()]


def under(path, folder) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


@pytest.fixture(scope="module")
def runs(setup):
    root, config = setup
    main = [sys.executable, "-m", "experiments.vsepp.main", f"--config={config}"]
    # Both at once, each preparing the dataset in its own data_dir (the 2-process run's:
    # process 0 first, then process 1 opens it).
    multi = [*main, f"--workdir={root / 'multi'}", f"--config.data.data_dir={root / 'tfds2'}"]
    started = []
    try:
        started.append(start([*main, f"--workdir={root / 'single'}"], root, "single"))
        started.append(start(multi, root, "multi", processes=2))
        _, logs = finish(*started)
    finally:
        kill(started)
    return root, logs


def final_params(workdir):
    *_, state = evaluate.load_run(str(workdir), which="latest")
    assert int(state.step) == NUM_STEPS
    return jax.tree.leaves(jax.device_get(state.params))


def test_two_processes_train_like_one(runs):
    root, _ = runs
    rows = {
        name: [r for r in jt.read_metrics(root / name) if "loss" in r]
        for name in ("single", "multi")
    }
    assert [r["step"] for r in rows["multi"]] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(
            [r[key] for r in rows["multi"]], [r[key] for r in rows["single"]], rtol=1e-5
        )
    # Not bit for bit: the 8-way gradient all-reduce adds in another order over gloo.
    for got, want in zip(final_params(root / "multi"), final_params(root / "single"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    results = {
        name: json.loads((root / name / "results.json").read_text()) for name in ("single", "multi")
    }
    assert results["multi"]["best_step"] == results["single"]["best_step"] == NUM_STEPS
    assert results["multi"]["test"] == pytest.approx(results["single"]["test"], rel=1e-6)
    assert results["multi"]["dev"] == pytest.approx(results["single"]["dev"], rel=1e-6)


def test_evaluation_is_split_and_equals_one_process_exactly(runs):
    root, logs = runs
    # Each process embedded half of the 32 dev images and of their 160 captions.
    out = (logs / "process0.out").read_text()
    split = "images embedded per process [16, 16], captions [80, 80]"
    assert f"Evaluation split over 2 processes: {split}." in out, out[-2000:]
    # The test numbers of the 2-process run are those of a single-process evaluation of
    # the same checkpoint, exactly.
    saved = json.loads((root / "multi" / "results.json").read_text())
    config, vocab, splits, graphdef, state = evaluate.load_run(str(root / "multi"))
    embed = train.make_embed_fn(graphdef, config)  # in this process, on its 8 devices
    test = retrieval.evaluate(*embed(state, splits["test"], vocab))
    assert saved["test"] == test.as_dict()


def test_only_process_zero_writes_and_nobody_reads_its_files(runs):
    root, _ = runs
    workdir, data_dir = root / "multi", root / "tfds2"
    own_files = [workdir / name for name in ("config.json", "vocab.txt", "results.json")]
    own_files.append(workdir / "metrics.jsonl")
    zero, one = accesses(root, "multi", 0), accesses(root, "multi", 1)
    written = {path for kind, path in zero if kind == "write"}
    for path in own_files:  # (config.json and vocab.txt go through a temporary file)
        assert any(
            p == str(path)
            or p.startswith(f"{path}.tmp")
            or p.startswith(str(path.parent / f".{path.name}."))
            for p in written
        ), path
    assert any(under(path, data_dir) for path in written)  # process 0 prepared the data
    # Process 1 writes nothing outside the checkpoints (orbax's multi-host protocol), not
    # even the dataset: process 0 had prepared it.
    for kind, path in one:
        if kind == "write":
            assert under(path, workdir / "checkpoints") or not (
                under(path, workdir) or under(path, data_dir)
            ), path
    # ... and never reads a file that process 0 wrote for itself.
    read = {os.path.abspath(path) for kind, path in one if kind == "read"}
    assert not read & {os.path.abspath(p) for p in own_files}
    assert not any(under(path, workdir / "tensorboard") for path in read)


def test_evaluate_entry_on_two_processes(runs):
    root, _ = runs
    command = [sys.executable, "-m", "experiments.vsepp.evaluate", f"--workdir={root / 'multi'}"]
    started = []
    try:
        started.append(start(command, root, "evaluate", processes=2))
        (logs,) = finish(*started)
    finally:
        kill(started)
    table = (logs / "process0.out").read_text()
    saved = json.loads((root / "multi" / "results.json").read_text())
    assert f"{saved['test']['rsum']:.1f}" in table.splitlines()[-1], table
    assert "images embedded per process [16, 16], captions [80, 80]" in table
    assert "rsum" not in (logs / "process1.out").read_text()  # process 0 prints
    read = {os.path.abspath(p) for kind, p in accesses(root, "evaluate", 1) if kind == "read"}
    for name in ("config.json", "vocab.txt"):  # received from process 0
        assert os.path.abspath(root / "multi" / name) not in read


# ----------------------------------------------------------------------------------------
# Each process reads only its slice of the evaluation data.
# ----------------------------------------------------------------------------------------
class CountingSource:
    """A list of records that remembers which ones were read."""

    def __init__(self, records):
        self.records, self.read = records, set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.records[i]


def merge_shards(per_shard, rows_per_batch):
    """Loop reference of the global order: batch by batch, shard by shard, real rows only."""
    merged = []
    for t in range(len(per_shard[0][0]) // rows_per_batch):
        for rows, mask in per_shard:
            block = slice(t * rows_per_batch, (t + 1) * rows_per_batch)
            merged.extend(row for row, real in zip(rows[block], mask[block], strict=True) if real)
    return np.stack(merged)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_eval_batches_reassemble_the_unsharded_ones(shards):
    data = generate_shapes(3, family_size=4, image_size=16, seed=0)  # 12 images, 60 captions
    records = [
        {"image": data.images[i], "captions": data.captions[i], "image_id": i, "group": 0}
        for i in range(len(data.images))
    ]
    vocab = build_vocabulary(data.flat_captions(), threshold=1)
    full_images = np.stack([r["image"] for r in records]).astype(np.float32) / 255
    full_tokens, _ = vocab.encode_batch(data.flat_captions(), max_length=12)
    concat = lambda batches, key: (
        np.concatenate([b[key] for b in batches]),
        np.concatenate([b["mask"] for b in batches]),
    )
    images, captions, read = [], [], []
    for shard in range(shards):
        source = CountingSource(records)
        # 6 rows per shard and batch: the last global batch of images is part padding.
        kw = dict(batch_size=6 * shards, shard_index=shard, shard_count=shards)
        image_batches = list(eval_image_batches(source, **kw))
        caption_batches = list(eval_caption_batches(source, vocab, max_length=12, **kw))
        assert {b["image"].shape[0] for b in image_batches} == {6}
        assert {b["tokens"].shape[0] for b in caption_batches} == {6}
        images.append(concat(image_batches, "image"))
        captions.append(concat(caption_batches, "tokens"))
        read.append(source.read)
    np.testing.assert_array_equal(merge_shards(images, 6), full_images)
    np.testing.assert_array_equal(merge_shards(captions, 6), full_tokens)
    if shards > 1:  # each shard reads only the records of its own rows
        assert all(len(r) < len(records) for r in read)
    else:  # and gather_rows reassembles them (here, on one process)
        rows, counts = distributed.gather_rows(*images[0], num_batches=len(image_batches))
        np.testing.assert_array_equal(rows, full_images)
        assert counts.tolist() == [12]

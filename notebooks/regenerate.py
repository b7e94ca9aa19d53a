"""Execute the Colab notebooks at full size and save them with their outputs.

    python notebooks/regenerate.py                  # every notebook in notebooks/
    python notebooks/regenerate.py vsepp dp_sgd     # some of them (with or without .ipynb)

Each notebook runs top to bottom in a fresh ``python3`` kernel, as it would in Colab: at
full size (``JAXEFF_NOTEBOOK_SMALL`` unset) and on one device (``XLA_FLAGS`` unset, so no
fake host devices), with a temporary working directory, so the results files, figures and
other artefacts it writes never land in the repository. The executed notebook (printed
tables, figures as PNG, the numbers behind them) is then written back in place.

The saved outputs are normalised so that a rerun gives a small diff: the per-cell
execution timestamps (``metadata.execution``) and any widget state are dropped, the
notebook's own metadata is kept as committed (not the kernel's Python version),
consecutive stream outputs are merged and carriage-return progress bars reduced to their
final line. What still changes between runs are the measured times the notebooks print,
and in ``vsepp.ipynb`` tensorflow-datasets' two lines about preparing the data, printed
only when ``/tmp/jaxeff_tfds`` does not hold them yet (as on a fresh Colab machine). A
notebook whose execution fails is left untouched and the script exits non-zero.

Full-size run times on a 2-core CPU with no accelerator, one notebook at a time, kernel
start included, measured while the machine also ran other jobs (a range: two runs at
different loads):

    vsepp.ipynb                11 to 16 min, nearly all of it the two 1500-step trainings
    gradient_variance.ipynb    about 1.2 min
    robust_linear.ipynb        about 40 s
    dp_sgd.ipynb               45 s to 2 min

``tests/test_notebooks.py`` executes every notebook at small size and checks its numbers,
and checks that each committed notebook carries the outputs of a run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
SIZE_WARNING_BYTES = 1_500_000

# Anything but a newline followed by a backspace erases that character; text before a
# carriage return that no newline follows is overwritten by the text after it.
_BACKSPACE = re.compile(r"[^\n\x08]\x08")
_OVERWRITTEN = re.compile(r"^[^\n]*\r(?=[^\n])", re.MULTILINE)


def final_text(text: str) -> str:
    """``text`` as a terminal shows it at the end: progress bars at their last state."""
    previous = None
    while previous != text:
        previous, text = text, _BACKSPACE.sub("", text)
    text = text.replace("\r\n", "\n")
    return _OVERWRITTEN.sub("", text)


def normalise_outputs(outputs: list) -> list:
    """Consecutive stream outputs of one name merged, with carriage returns resolved."""
    merged = []
    for output in outputs:
        if output.get("output_type") == "stream":
            last = merged[-1] if merged else None
            if last is not None and last.get("output_type") == "stream":
                if last["name"] == output["name"]:
                    last["text"] += output["text"]
                    continue
        merged.append(output)
    for output in merged:
        if output.get("output_type") == "stream":
            output["text"] = final_text(output["text"])
    return [o for o in merged if o.get("output_type") != "stream" or o["text"]]


def clean(executed: nbformat.NotebookNode, original_metadata: dict) -> nbformat.NotebookNode:
    """Strips what changes on every run and is not a result."""
    executed.metadata = nbformat.from_dict(original_metadata)
    executed.metadata.pop("widgets", None)
    for cell in executed.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("widgets", None)
        if cell.cell_type == "code":
            cell.outputs = normalise_outputs(cell.outputs)
            for output in cell.outputs:
                output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    return executed


def kernel_environment() -> None:
    """The kernel inherits this process's environment: make it Colab's (full size, one
    device)."""
    os.environ.pop("JAXEFF_NOTEBOOK_SMALL", None)
    os.environ.pop("XLA_FLAGS", None)


def cell_times(nb: nbformat.NotebookNode) -> list[tuple[float, int]]:
    """``(seconds, cell index)`` of each executed code cell, from nbclient's timestamps."""
    from datetime import datetime

    times = []
    for index, cell in enumerate(nb.cells):
        execution = cell.metadata.get("execution", {})
        start, end = execution.get("iopub.execute_input"), execution.get("shell.execute_reply")
        if start and end:
            seconds = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(
                start.replace("Z", "+00:00")
            )
            times.append((seconds.total_seconds(), index))
    return times


def regenerate(path: pathlib.Path, *, timeout: int) -> float:
    """Executes ``path`` at full size and writes it back with its outputs; returns seconds."""
    nb = nbformat.read(path, as_version=4)
    original_metadata = nbformat.from_dict(dict(nb.metadata))
    for cell in nb.cells:  # a fresh run, whatever was saved before
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    with tempfile.TemporaryDirectory(prefix=f"jaxeff_{path.stem}_") as workdir:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": workdir}},
            record_timing=True,
            store_widget_state=False,
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    slowest = sorted(cell_times(nb), reverse=True)[:3]
    nbformat.validate(nb)
    nbformat.write(clean(nb, original_metadata), path)
    size = path.stat().st_size
    print(
        f"{path.name}: {seconds / 60:.1f} min, {size / 1e6:.2f} MB; slowest cells "
        + ", ".join(f"[{i}] {s:.0f} s" for s, i in slowest),
        flush=True,
    )
    if size > SIZE_WARNING_BYTES:
        print(f"  warning: {path.name} is over {SIZE_WARNING_BYTES / 1e6:.1f} MB", flush=True)
    return seconds


def resolve(name: str) -> pathlib.Path:
    path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.is_file():
        path = pathlib.Path(name).resolve()
    if not path.is_file():
        raise SystemExit(f"no notebook {name!r} in {NOTEBOOK_DIR}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [resolve(n) for n in args.names] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    kernel_environment()
    failed = []
    for path in paths:
        print(f"{path.name}: running at full size ...", flush=True)
        try:
            regenerate(path, timeout=args.timeout)
        except CellExecutionError as err:
            print(f"{path.name}: FAILED, left unchanged\n{err}", file=sys.stderr, flush=True)
            failed.append(path.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Colab notebooks execute top to bottom (at small size) and report sane numbers."""

import json
import math
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from jaxeff.losses import COLLAPSE_SPREAD

NOTEBOOKS = sorted(pathlib.Path(__file__).parent.parent.joinpath("notebooks").glob("*.ipynb"))
KS = (1, 5, 10)


def chance_recalls(num_images, captions_per_image=5):
    """R@1/5/10 (percent) of random scores: ``(image→text, text→image)``.

    Image→text: rank < K when one of the image's captions is among the K best of all
    ``m = 5N`` captions, probability ``1 - C(m - 5, K) / C(m, K)``. Text→image: the own
    image is among the K best of ``N`` with probability ``K / N``.
    """
    m = captions_per_image * num_images
    i2t = [100 * (1 - math.comb(m - captions_per_image, k) / math.comb(m, k)) for k in KS]
    t2i = [100 * k / num_images for k in KS]
    return i2t, t2i


def check_retrieval_numbers(name, run, num_images, captions_per_image=5):
    """Recalls in [0, 100], monotone in K, summing to rsum and agreeing with the ranks."""
    queries = {"i2t": num_images, "t2i": captions_per_image * num_images}
    worst_rank = {"i2t": captions_per_image * (num_images - 1), "t2i": num_images - 1}
    recalls = [run[f"{d}_r{k}"] for d in queries for k in KS]
    assert all(0 <= r <= 100 for r in recalls), (name, recalls)
    assert run["rsum"] == pytest.approx(sum(recalls), rel=1e-9), name
    for d, count in queries.items():
        r = [run[f"{d}_r{k}"] for k in KS]
        assert r[0] <= r[1] <= r[2], (name, d, r)
        # Each recall is a whole number of queries out of `count`.
        np.testing.assert_allclose(
            np.multiply(r, count / 100), np.round(np.multiply(r, count / 100)), atol=1e-6
        )
        medr, meanr = run[f"{d}_medr"], run[f"{d}_meanr"]
        assert medr == int(medr) and 1 <= medr <= worst_rank[d] + 1, (name, d, medr)
        assert 1 <= meanr <= worst_rank[d] + 1, (name, d, meanr)
        for k, recall in zip(KS, r, strict=True):  # medr <= K exactly when most ranks are < K
            if recall > 50:
                assert medr <= k, (name, d, k, recall, medr)
            elif recall < 50:
                assert medr > k, (name, d, k, recall, medr)


def check_vsepp(workdir):
    summary = json.loads((workdir / "vsepp_results.json").read_text())
    num_images, batch, margin = summary["test_images"], summary["batch_size"], summary["margin"]
    assert num_images >= 32  # the chance margins below need a test set this large

    # The loss cell: finite values, collapsed scores cost exactly the margin per hinge.
    comparison = summary["loss_comparison"]
    assert all(math.isfinite(v) for losses in comparison.values() for v in losses.values())
    np.testing.assert_allclose(comparison["collapsed"]["MH"], 2 * batch * margin, rtol=1e-5)
    np.testing.assert_allclose(
        comparison["collapsed"]["SH"], 2 * batch * (batch - 1) * margin, rtol=1e-5
    )
    sh, mh = comparison["random"]["SH"], comparison["random"]["MH"]
    assert sh / (batch - 1) <= mh < sh  # the hardest hinge is at least the mean one

    runs = summary["runs"]
    assert set(runs) == {"VSE0 (SH)", "VSE++ (MH)"}
    for name, run in runs.items():
        check_retrieval_numbers(name, run, num_images)
        assert math.isfinite(run["final_loss"]) and run["final_loss"] >= 0, name
        assert math.isfinite(run["final_sim_spread"]) and run["final_sim_spread"] >= 0, name

    # The trained baseline beats chance retrieval clearly. At 32 test images chance is
    # R@1 = 3.1 % and rsum = 95.9; the small run reaches R@1 of 21.9 / 23.1 and rsum 369,
    # an untrained model 6.2 / 3.1 and 108. VSE++ is held only to the sanity checks above:
    # after 150 steps its MH phase still sits near the collapse (loss close to 2·B·margin).
    i2t_chance, t2i_chance = chance_recalls(num_images)
    baseline = runs["VSE0 (SH)"]
    assert baseline["i2t_r1"] >= 4 * i2t_chance[0], baseline
    assert baseline["t2i_r1"] >= 4 * t2i_chance[0], baseline
    assert baseline["rsum"] >= 2.5 * (sum(i2t_chance) + sum(t2i_chance)), baseline
    assert baseline["final_sim_spread"] > 10 * COLLAPSE_SPREAD, baseline


RESULT_CHECKS = {"vsepp.ipynb": check_vsepp}


def test_every_notebook_has_result_checks():
    assert {p.name for p in NOTEBOOKS} == set(RESULT_CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_reports_sane_numbers(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEFF_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as in Colab
    nb = nbformat.read(path, as_version=4)
    # The notebook runs in tmp_path, where it writes its results file.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    RESULT_CHECKS[path.name](tmp_path)

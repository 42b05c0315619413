"""The study's numbers: a run's result from its records, a cell's mean and sample std over seeds,
the verdict and the paper's targets (the end-to-end tests check the text, these the values)."""

import pytest

from groupnorm.study import report


def _res(val, seconds=1.0, noise=None):
    return {"val_error": val, "train_error": val / 2, "seconds": seconds, "cpu_seconds": seconds,
            "activation_bytes": 1, "max_rss_bytes": 1, "curve_val": [val], "curve_train": [val / 2],
            "bn_noise": noise}


def test_summary_is_the_mean_and_sample_std_over_seeds():
    """A cell is the arithmetic mean over seeds and the sample (n-1) standard deviation."""
    results = {("iid", "gn", 4, s): _res(v) for s, v in enumerate((1.0, 2.0, 6.0))}
    cell = report.summarize(results)["iid", "gn", 4]
    assert cell["mean"] == pytest.approx(3.0)  # the median would be 2
    assert cell["std"] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)  # pstdev would divide by 3
    assert cell["seeds"] == 3 and cell["train_mean"] == pytest.approx(1.5)


def test_verdict_numbers():
    """BN's change is small-batch minus big-batch error (positive: grows); GN's range is max-min;
    the GN-BN gap at the largest N is GN minus BN."""
    s = {("iid", "bn", 32): {"mean": 10.0}, ("iid", "bn", 2): {"mean": 14.5}, ("iid", "bn", 1): {"mean": 30.0},
         ("iid", "gn", 32): {"mean": 11.0}, ("iid", "gn", 2): {"mean": 11.5}, ("iid", "gn", 1): {"mean": 10.75}}
    v = report.verdict(s)
    assert "BN's error grows by +20.00 points from N=32 (10.00%) to N=1 (30.00%), +4.50 at N=2" in v
    assert "GN's varies by 0.75 points across N=32..1 (10.75-11.50%)" in v
    assert "at N=32 GN is +1.00 points from BN" in v
    s2 = {("iid", "bn", 32): {"mean": 10.0}, ("iid", "bn", 4): {"mean": 8.0}}
    assert "BN's error falls by 2.00 points" in report.verdict(s2)


def test_paper_targets_are_judged_on_the_numbers():
    """GN within 1 point of BN at the largest N is |GN - BN| <= 1 (GN 2 points better is not within);
    BN at N=2 at least 2 points worse; GN's spread at most 1."""
    s = {("iid", "bn", 32): {"mean": 10.0}, ("iid", "gn", 32): {"mean": 8.0}, ("iid", "bn", 2): {"mean": 11.0},
         ("iid", "gn", 2): {"mean": 8.5}}
    got = {d.split(" ")[0] + d.split(" ")[1]: (ok, v) for d, ok, v in report.paper_targets(s)}
    assert got["GNat"] == (False, "-2.00")
    assert got["BNat"] == (False, "+1.00")
    assert got["GN'sspread"] == (True, "0.50")
    s[("iid", "gn", 32)] = {"mean": 10.9}
    s[("iid", "bn", 2)] = {"mean": 12.0}
    got = {d.split(" ")[0] + d.split(" ")[1]: (ok, v) for d, ok, v in report.paper_targets(s)}
    assert got["GNat"][0] is True and got["BNat"] == (True, "+2.00")


def test_run_result_seconds_sum_every_epoch_and_noise_is_the_last_probe():
    """A run's cost is the sum of its epochs' seconds; its BN noise is the last probe's, and a
    cell's noise is the mean over layers, then over seeds."""
    def rec(e, noise):
        r = {"config": "c", "sampling": "iid", "norm": "bn", "batch": 4, "seed": 0, "epoch": e, "val_error": 5.0,
             "train_error": 1.0, "epoch_seconds": float(e), "epoch_cpu_seconds": 2.0 * e}
        if noise is not None:
            r["bn_noise"] = [{"layer": "a", "mean_rel_err": noise, "var_rel_err": noise},
                             {"layer": "b", "mean_rel_err": 3 * noise, "var_rel_err": noise}]
            r["bn_noise_probe"] = "iid"
        return r

    res = report.run_results([rec(1, 1.0), rec(2, None), rec(3, 0.1)], "c", 1, epochs=3)[("iid", "bn", 4, 0)]
    assert res["seconds"] == pytest.approx(6.0) and res["cpu_seconds"] == pytest.approx(12.0)
    assert res["bn_noise"][0]["mean_rel_err"] == pytest.approx(0.1)  # epoch 3's probe, not epoch 1's
    cell = report.summarize({("iid", "bn", 4, 0): res})["iid", "bn", 4]
    assert cell["mean_rel_err"] == pytest.approx(0.2)  # mean of 0.1 and 0.3, not the max
    assert cell["var_rel_err"] == pytest.approx(0.1)

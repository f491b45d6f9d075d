"""The between-seed statistics of `benchmarks/cifar10_reproduction/cifar10_demo_curve.py`, on hand-computed examples."""

import json

import pytest

from .cifar10_demo_curve import (
    criterion_between_runs,
    earlier_runs,
    loss_against_knn,
    merged_runs,
    permutation_test,
    run_summary,
    seed_spread,
)


def runs(*curves: list[float]) -> dict[int, list[dict]]:
    return {
        seed: [{"epoch": epoch, "knn_top1_head": value} for epoch, value in enumerate(curve, 1)]
        for seed, curve in enumerate(curves)
    }


def test_seed_spread_is_mean_sample_sd_and_range_where_two_runs_reached_the_epoch():
    spread = seed_spread(runs([30.0, 40.0, 50.0], [32.0, 41.0], [34.0, 45.0]))
    # epoch 1: 30, 32, 34: mean 32, sample sd 2; epoch 2: 40, 41, 45: mean 42, sd sqrt(7); epoch 3 has one run only.
    assert spread == [
        {"epoch": 1, "runs": 3, "mean": 32.0, "sd": 2.0, "min": 30.0, "max": 34.0},
        {"epoch": 2, "runs": 3, "mean": 42.0, "sd": 2.65, "min": 40.0, "max": 45.0},
    ]


def test_permutation_test_counts_the_splits_as_far_apart_as_the_observed_one():
    # Over the one epoch all six runs reached: ours 3, 4, 5 against 0, 1, 2. Of the 20 ways to pick three of six,
    # only {3, 4, 5} and its complement differ by 3 points: p = 2 / 20.
    separated = permutation_test(runs([3.0, 9.0], [4.0], [5.0]), runs([0.0], [1.0], [2.0]))
    assert separated["epochs"] == [1]
    assert separated["difference"] == 3.0
    assert separated["p_value_two_sided"] == separated["smallest_possible_p"] == 0.1
    # Interleaved (ours 0, 2, 4 against 1, 3, 5: difference -1): a split whose three sum to S differs by (2S - 15) / 3,
    # at least 1 in size when S <= 6 (7 of the 20 triples) or S >= 9 (another 7): p = 14 / 20.
    interleaved = permutation_test(runs([0.0], [2.0], [4.0]), runs([1.0], [3.0], [5.0]))
    assert interleaved["difference"] == -1.0
    assert interleaved["p_value_two_sided"] == 0.7


def test_criterion_between_runs_compares_every_pair_from_epoch_3_where_both_reached():
    ours = runs([30.0, 35.0, 40.0, 42.0], [31.0, 36.0, 41.5, 44.0])
    demo_code = runs([29.0, 34.0, 40.5, 43.0], [33.0, 37.0])  # its seed 1 stopped at epoch 2: compared with none
    result = criterion_between_runs({"ours": ours, "demo code": demo_code})
    # ours 0 - ours 1: -1.5 (on the edge: within), -2.0 (out); ours 0 - demo 0: -0.5, -1.0; ours 1 - demo 0: 1, 1.
    assert [(pair["runs"], pair["difference"], pair["within_tolerance"]) for pair in result["pairs"]] == [
        (["ours seed 0", "ours seed 1"], {3: -1.5, 4: -2.0}, False),
        (["ours seed 0", "demo code seed 0"], {3: -0.5, 4: -1.0}, True),
        (["ours seed 1", "demo code seed 0"], {3: 1.0, 4: 1.0}, True),
    ]
    assert result["pairs_within_tolerance"] == {
        "ours vs ours": {"within": 0, "of": 1},
        "ours vs demo code": {"within": 2, "of": 2},
    }


def test_loss_against_knn_fits_a_line_across_runs_where_three_reached_the_epoch():
    def run(*epochs: tuple[float, float]) -> list[dict]:
        return [{"epoch": e, "loss": loss, "knn_top1_head": knn} for e, (loss, knn) in enumerate(epochs, 1)]

    # Epoch 1: losses 1, 2, 3 against accuracies 30, 50, 40: deviations (-1, 0, 1) and (-10, 10, 0): r = 10 / sqrt(2
    # * 200) = 0.5, slope 10 / 2 = 5, intercept 40 - 5 * 2 = 30; the log (loss 4, 45) lies 45 - 50 = -5 from the line.
    # Epoch 2: on the line kNN = 65 - 5 loss, r = -1; the log (loss 6, 36) is +1 from it. Epoch 3: two runs, left out.
    reference = {1: {"loss": 4.0, "knn_top1": 45.0}, 2: {"loss": 6.0, "knn_top1": 36.0}}
    result = loss_against_knn([run((1.0, 30.0), (7.0, 30.0), (6.0, 1.0)), run((2.0, 50.0), (6.0, 35.0), (5.0, 2.0)),
                               run((3.0, 40.0), (5.0, 40.0))], reference)  # fmt: skip
    assert result == [
        {"epoch": 1, "runs": 3, "pearson_r": 0.5, "slope_points_per_loss": 5.0, "intercept": 30.0,
         "log_minus_line": -5.0},
        {"epoch": 2, "runs": 3, "pearson_r": -1.0, "slope_points_per_loss": -5.0, "intercept": 65.0,
         "log_minus_line": 1.0},
    ]  # fmt: skip


def test_runs_of_an_earlier_result_file_keep_their_rows_and_name_their_machine(tmp_path):
    rows = [{"epoch": 1, "knn_top1_head": 33.0, "loss": 6.9}]
    older = {"device": "Xeon (2 cores), 1 process", "mixed_precision": ["bf16"],  # one machine for all its runs
             "runs": [{"seed": 4, "output_dir": "outputs/s4", "command": "bash a", "epochs": rows}]}  # fmt: skip
    newer = {"device": "Xeon; EPYC", "mixed_precision": ["bf16", "no"],
             "runs": [{"seed": 6, "output_dir": "outputs/s6", "command": "bash b", "epochs": rows,
                       "device": "EPYC (2 cores), 1 process", "mixed_precision": "no"}]}  # fmt: skip
    (tmp_path / "older.json").write_text(json.dumps(older))
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    (kept,) = earlier_runs(tmp_path / "older.json")
    assert kept == {"seed": 4, "output_dir": "outputs/s4", "command": "bash a", "device": "Xeon (2 cores), 1 process",
                    "mixed_precision": "bf16", "epochs": rows}  # fmt: skip
    (per_run,) = earlier_runs(tmp_path / "newer.json")
    assert (per_run["device"], per_run["mixed_precision"]) == ("EPYC (2 cores), 1 process", "no")
    # Written back, a kept run is the same entry, with its distance to the log recomputed: 33.0 - 31.0.
    summary = run_summary(per_run, {1: {"knn_top1": 31.0}})
    assert summary["difference_head_vs_demo"] == {1: 2.0}
    assert {key: summary[key] for key in per_run} == per_run


def test_a_seed_trained_again_replaces_its_earlier_entry_and_a_seed_twice_among_new_runs_is_refused():
    earlier = [{"seed": 0, "epochs": [1]}, {"seed": 6, "epochs": [1, 2, 3]}]
    continued = {"seed": 6, "epochs": [1, 2, 3, 4, 5]}
    assert merged_runs(earlier, [continued]) == [{"seed": 0, "epochs": [1]}, continued]
    with pytest.raises(ValueError, match=r"got seeds \[6, 6\]"):
        merged_runs(earlier, [continued, continued])

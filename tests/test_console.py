"""Console output: the experiments' summary table."""

from nnbackprop.console import format_table


def test_format_table_aligns_columns_and_keeps_two_decimals_in_percent_columns() -> None:
    table = format_table([{"run": "Nesterov", "test acc %": 89.0, "loss": 0.31694, "updates": 8600},
                          {"run": "full-batch GD", "test acc %": 56.963, "loss": 1.7312, "updates": 20}])
    assert table.splitlines() == [
        "run            test acc %  loss    updates",
        "-------------  ----------  ------  -------",
        "Nesterov            89.00  0.3169     8600",
        "full-batch GD       56.96   1.731       20",
    ]

"""The ML.ENERGY figures the energy predictor, the replica model and ``router bill
--compare-seed`` use, shipped with the package (``forecasting/data/``) so that they work on a
machine with no data folder and no network.

The shipped tables are the columns the project reads of three ML.ENERGY tables, values
unchanged (Apache-2.0, see ``forecasting/data/NOTICE.mlenergy.md``):

- ``mlenergy_v3_llm_configurations.csv``: ML.ENERGY Benchmark v3 (ml-energy/leaderboard @
  0cd52dab897c5d91a45f4d413038f3b8b4251b0f, public/data/models/), one row per configuration,
  flattened from the leaderboard's JSON files;
- ``mlenergy_v2_llm_configurations.csv``: ML.ENERGY leaderboard v2 (ml-energy/leaderboard-v2 @
  c3af7f31e231a2a7021c5f8e2a54dd712d02e6e2), flattened likewise;
- ``mlenergy_v1_A100_chat_benchmark.csv``: the 2023 batch-size-1 table for A100, chat
  (ml-energy/leaderboard-v2 @ 07a9e132d1858ec87a6d054b601bceb23606d105, data/).

Regenerate them from a data folder with the layout of the project's data share::

    python -m forecasting.mlenergy /path/to/shared/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from forecasting.errors import DatasetError

PACKAGE_DATA = Path(__file__).with_name("data")

# shipped file -> (file in the data layout it is derived from, the columns kept)
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlenergy_v3_llm_configurations.csv": (
        "energy/mlenergy_v3/mlenergy_v3_llm_configurations.csv",
        (
            "model_id",
            "task",
            "architecture",
            "total_params_b",
            "active_params_b",
            "weight_precision",
            "gpu_model",
            "num_gpus",
            "tensor_parallel",
            "expert_parallel",
            "data_parallel",
            "max_num_seqs",
            "avg_batch_size",
            "avg_output_len",
            "avg_power_watts",
            "energy_per_request_joules",
            "energy_per_token_joules",
            "output_throughput_tok_s",
            "median_itl_ms",
        ),
    ),
    "mlenergy_v2_llm_configurations.csv": (
        "energy/mlenergy_v2/mlenergy_v2_llm_configurations.csv",
        (
            "task",
            "model",
            "gpu",
            "tp",
            "pp",
            "max_batch_size",
            "avg_batch_size",
            "avg_output_tokens",
            "energy_per_request_J",
            "energy_per_output_token_J",
            "token_throughput_tok_s",
            "avg_tpot_s",
        ),
    ),
    "mlenergy_v1_A100_chat_benchmark.csv": (
        "energy/mlenergy_v1_legacy_bs1/A100_chat_benchmark.csv",
        ("model", "response_length", "energy"),
    ),
}
# the names the predictor and the invoice code ask for, in the data layout
LAYOUT_NAMES = {source: shipped for shipped, (source, _) in TABLES.items()}


def derive(data_dir: Path, shipped: str) -> pd.DataFrame:
    """The shipped table ``shipped``, derived from the data folder ``data_dir``."""
    source, columns = TABLES[shipped]
    return pd.read_csv(data_dir / source, usecols=list(columns))[list(columns)]


def table_path(name: str) -> Path:
    """Path of the shipped table for ``name``, given in the data layout
    (``energy/mlenergy_v3/mlenergy_v3_llm_configurations.csv``) or as the shipped file name."""
    shipped = LAYOUT_NAMES.get(name, name)
    if shipped not in TABLES:
        raise DatasetError(f"{name} is not a shipped ML.ENERGY table; shipped: {sorted(TABLES)}")
    path = PACKAGE_DATA / shipped
    if not path.is_file():
        raise DatasetError(
            f"the package data file {path} is missing: reinstall carbon-router, or regenerate "
            "it with `python -m forecasting.mlenergy <data folder>`"
        )
    return path


def write(data_dir: Path, out_dir: Path = PACKAGE_DATA) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shipped in TABLES:
        path = out_dir / shipped
        derive(data_dir, shipped).to_csv(path, index=False)
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - a maintenance script
    if len(sys.argv) != 2:
        sys.exit("usage: python -m forecasting.mlenergy DATA_DIR (the data share's layout)")
    for p in write(Path(sys.argv[1])):
        print(p)

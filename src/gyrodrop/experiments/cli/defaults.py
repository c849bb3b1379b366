"""Default option values of the ``gyrodrop`` command line, per command: the command
defaults, ``--quick``'s and ``--recipe paper``'s overrides, and each command's
examples for ``--help``.

Re-exported by :mod:`.options`, which resolves them (explicit > ``--quick`` defaults >
command defaults).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "QUICK", "PAPER", "EXAMPLES"]

#: Per-command defaults; ``--quick`` overrides them (explicit options always win).
DEFAULTS: dict[str, dict[str, Any]] = {
    "common": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 20,
        "seeds": 3,
        "batch_size": 256,
        "lr": 1e-3,
        "optimizer": "rmsprop",
        "momentum": 0.0,
        "p": 0.5,
        "num_subnets": [256],
        "subnets_per_step": [16],
        "block_size": 32,
        "mc_samples": 30,
        "limit": None,
        "input_p": None,
        "max_norm": None,
    },
    "compare": {"methods": ["none", "dropout", "gyro"]},
    "sweep": {
        "methods": ["gyro"],
        "baselines": ["dropout"],
        "seeds": 2,
        "num_subnets": [16, 64, 256, 1024],
        "subnets_per_step": [1, 2, 4, 8, 16],
    },
    "diversity": {"methods": ["dropout", "gyro"], "seeds": 1, "subnetworks": 10, "eval_size": 1000},
    "bench": {
        "methods": None,
        "dataset": "fashion-mnist",
        "model": "mlp1",
        "seeds": 1,
        "steps": 30,
        "warmup": 5,
        "layer_features": 1024,
    },
    "cv": {
        "methods": ["dropout", "gyro"],
        "dataset": "breast_cancer",
        "widths": [60, 30],
        "folds": 10,
        "seeds": 1,
        "epochs": 50,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "p": 0.2,
        "input_p": 0.2,
        "max_norm": 3.0,
        "num_subnets": [64],
        "subnets_per_step": [4],
    },
}
#: ``--recipe paper``: the authors' settings (mlsys-seo/gyro-dropout ``main.py``), over
#: the command defaults and under ``--quick`` and explicit options.
PAPER: dict[str, Any] = {
    "model": "paper-mlp",
    "optimizer": "rmsprop-tf1",
    "lr": 0.007,
    "momentum": 0.9,
    "batch_size": 256,
    "p": 0.5,
    "num_subnets": [256],
    "subnets_per_step": [16],
}

QUICK: dict[str, dict[str, Any]] = {
    "common": {
        "epochs": 5,
        "seeds": 2,
        "limit": 512,
        "batch_size": 128,
        "num_subnets": [16],
        "subnets_per_step": [4],
        "mc_samples": 5,
    },
    "compare": {},
    "sweep": {"seeds": 1, "epochs": 2, "num_subnets": [8, 16], "subnets_per_step": [2, 4]},
    "diversity": {"seeds": 1, "epochs": 2, "subnetworks": 4, "eval_size": 200},
    "bench": {
        "dataset": "digits",
        "model": "mlp",
        "steps": 3,
        "warmup": 1,
        "layer_features": 256,
        "batch_size": 64,
    },
    "cv": {"folds": 3, "epochs": 10, "seeds": 1, "batch_size": 32},
}

EXAMPLES = {
    "compare": """examples:
  gyrodrop compare --quick
  gyrodrop compare --dataset digits --methods none,dropout,gyro --seeds 3 --epochs 20
  gyrodrop compare --dataset fashion-mnist --model mlp2 --methods dropout,gyro --seeds 5 --epochs 10
  gyrodrop compare --dataset cifar10 --data-dir ~/data --model alexnet --uncertainty
  gyrodrop compare --dataset fashion-mnist --uncertainty --ood-classes 5,6,7,8,9""",
    "sweep": """examples:
  gyrodrop sweep --quick
  gyrodrop sweep --dataset digits --num-subnets 16,64,256,1024 --subnets-per-step 1,2,4,8,16
  gyrodrop sweep --dataset fashion-mnist --model mlp2 --epochs 5 \\
      --num-subnets 64,256,1024 --subnets-per-step 4,16""",
    "diversity": """examples:
  gyrodrop diversity --quick
  gyrodrop diversity --dataset digits --methods dropout,gyro --seeds 3""",
    "bench": """examples:
  gyrodrop bench --quick
  gyrodrop bench --model mlp1 --dataset fashion-mnist --methods dropout,gyro,blockwise""",
    "cv": """examples:
  gyrodrop cv --quick
  gyrodrop cv --dataset csv:sonar.csv --folds 10 --epochs 300 --batch-size 16
  gyrodrop cv --dataset breast_cancer --input-p 0 --max-norm 0  # hidden dropout only""",
    "report": """examples:
  gyrodrop report --db results.db
  gyrodrop report --db results.db --format json > runs.json
  gyrodrop report --db results.db --format csv --experiment compare
  gyrodrop report --db results.db --paired dropout --format json""",
}

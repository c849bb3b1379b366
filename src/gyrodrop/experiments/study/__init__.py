"""``gyrodrop study``: planned grids of single runs and their statistics.

:mod:`.plan` (plan files and built-in plans, checked and expanded seed-major into
:class:`~gyrodrop.experiments.train.RunConfig` s), :mod:`.subsets` (the held-out
validation split and the seeded, nested training subsets), :mod:`.stats` (derived
per-run metrics, paired differences, Holm's correction) and :mod:`.report` (Markdown,
JSON and the plot). The command itself is :mod:`gyrodrop.experiments.cli.study`.
"""

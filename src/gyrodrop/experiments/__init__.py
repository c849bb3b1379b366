"""Experiments: the paper's models, data loaders, trainer, results store and the
``gyrodrop`` command line (``gyrodrop --help``).

Importing this package is cheap: matplotlib, rich and scikit-learn are imported only by
the commands that need them (install them with ``pip install "gyrodrop[experiments]"``).
"""

"""Loaded by every party process a test starts with this folder on PYTHONPATH.

MEDMPC_TEST_FORBID_WEAK_RNG=1: every draw from torch's or NumPy's generators raises
(rng_guard). MEDMPC_TEST_STREAM=mt19937: CrypTen's generators become MT19937, as stock
CrypTen's are (the control that shows an attack test can succeed). MEDMPC_TEST_DRILLS: failure
drills in the federated roles (drills). MEDMPC_TEST_GATE_MASK=zero: the dealer masks one-round
gate openings with zero (the control that shows an opening test can fail).
"""

import os

if os.environ.get("MEDMPC_TEST_FORBID_WEAK_RNG") == "1":
    import rng_guard

    rng_guard.install()

if os.environ.get("MEDMPC_TEST_STREAM") == "mt19937":
    import weak_stream

    weak_stream.install()

if os.environ.get("MEDMPC_TEST_DRILLS"):
    import drills

    drills.install()

if os.environ.get("MEDMPC_TEST_GATE_MASK") == "zero":
    import numpy as np

    from medmpc.mpc import prg

    prg.random_words = lambda n: np.zeros(n, np.uint64)

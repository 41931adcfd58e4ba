"""Loaded by every party process a test starts with this folder on PYTHONPATH.

MEDMPC_TEST_FORBID_WEAK_RNG=1: every draw from torch's or NumPy's generators raises
(rng_guard). MEDMPC_TEST_STREAM=mt19937: CrypTen's generators become MT19937, as stock
CrypTen's are (the control that shows an attack test can succeed). MEDMPC_TEST_DRILLS: failure
drills in the federated roles (drills). MEDMPC_TEST_GATE_MASK=zero: the dealer masks one-round
gate openings and the convolutions' inputs with zero (the control that shows an opening test
can fail).
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

    from medmpc.mpc import crypten_compat

    install = crypten_compat.install

    def install_unmasked():  # CrypTen is importable only once patched
        crypten = install()
        dealer = crypten.mpc.provider.ttp_provider.TrustedThirdParty
        triple = dealer.generate_additive_triple
        if getattr(triple, "unmasked", False):
            return crypten

        def unmasked_triple(self, size0, size1, op, *args, **kwargs):
            a, b, c = triple(self, size0, size1, op, *args, **kwargs)
            if op == "conv2d":  # a = 0, so c = conv(a, b) = 0: still a valid triple
                a.share, c.share = a.share * 0, c.share * 0
            return a, b, c

        unmasked_triple.unmasked = True
        dealer.generate_additive_triple = unmasked_triple
        return crypten

    crypten_compat.install = install_unmasked

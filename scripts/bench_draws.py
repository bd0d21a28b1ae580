"""Time one frequency-matched random draw (analysis.ablate.matched_random) at the sizes of
Llama-7B neurons [32, 11008] and Mixtral expert neurons [32, 8, 14336], with a 1% set of
each group's most frequent units (the hard case: their neighbours are set members).
Prints the seconds of the sort (once per ablation_matrix call), of one draw, and a digest of the draw (two versions must draw alike).

    PYTHONPATH=$PWD python scripts/bench_draws.py
"""
import hashlib
import time

import numpy as np

from sparcom_jax.analysis.ablate import frequency_order, matched_random


def main() -> None:
    rng = np.random.default_rng(0)
    for shape, lead in (((32, 11008), 1), ((32, 8, 14336), 2)):
        freq = np.round(rng.beta(0.5, 5.0, shape), 3)  # rounded: many ties, as counts / n give
        top = np.argsort(-freq, axis=-1)[..., : shape[-1] // 100]
        mask = np.zeros(shape, bool)
        np.put_along_axis(mask, top, True, axis=-1)
        t = time.perf_counter()
        order = frequency_order(freq, lead)  # once per ablation_matrix call
        t_sort = time.perf_counter() - t
        t = time.perf_counter()
        drawn, _ = matched_random(mask, np.random.default_rng(1), freq, lead=lead, order=order)
        took = time.perf_counter() - t
        print(f"{shape}: sort {t_sort:.3f} s, one draw {took:.3f} s, "
              f"digest {hashlib.sha1(np.packbits(drawn)).hexdigest()[:12]}")


if __name__ == "__main__":
    main()

"""The portfolio-risk computation written the way a user would write it in NumPy.

Reads the same JSON payload as the `portfolio-risk` kernel, simulates the same
model (correlated log-normal moves, Black-Scholes revaluation of the options),
and reports the same figures: VaR and ES per level, mean and stdev of P&L, a
histogram, per-position ES contributions.

    python numpy_portfolio.py PAYLOAD.json [--repeat N]

Prints `numpy paths/s per core: X` (the best of the repeats). Run it with
OPENBLAS_NUM_THREADS=1 so that the figure is for one core.
"""

import argparse
import json
import math
import sys
import time

import numpy as np

try:
    from scipy.special import ndtr
except ImportError:  # no SciPy: the standard normal CDF by Hart's rational approximation

    def ndtr(x):
        xa = np.abs(x)
        e = np.exp(-0.5 * xa * xa)
        p = ((((((0.0352624965998911 * xa + 0.700383064443688) * xa + 6.37396220353165) * xa
                + 33.912866078383) * xa + 112.079291497871) * xa + 221.213596169931) * xa
             + 220.206867912376)
        q = (((((((0.0883883476483184 * xa + 1.75566716318264) * xa + 16.064177579207) * xa
                 + 86.7807322029461) * xa + 296.564248779674) * xa + 637.333633378831) * xa
              + 793.826512519948) * xa + 440.413735824752)
        c = e * p / q
        return np.where(x > 0, 1.0 - c, c)


TRADING_DAYS = 252.0
BATCH = 50_000


def black_scholes(s, k, r, vol, tau, is_call):
    if tau <= 0:
        return np.maximum(s - k, 0.0) if is_call else np.maximum(k - s, 0.0)
    sd = vol * math.sqrt(tau)
    d1 = (np.log(s / k) + (r + 0.5 * vol * vol) * tau) / sd
    d2 = d1 - sd
    kd = k * math.exp(-r * tau)
    if is_call:
        return s * ndtr(d1) - kd * ndtr(d2)
    return kd * ndtr(-d2) - s * ndtr(-d1)


def risk(payload, rng):
    assets = payload["assets"]
    index = {a["name"]: i for i, a in enumerate(assets)}
    s0 = np.array([a["price"] for a in assets])
    vol = np.array([a["vol"] for a in assets])
    drift = np.array([a.get("drift", 0.0) for a in assets])
    chol = np.linalg.cholesky(np.array(payload["correlation"]))
    r = payload.get("rate", 0.0)
    h = payload["horizon_days"] / TRADING_DAYS
    n = payload["paths"]
    positions = payload["positions"]
    levels = payload["confidence"]

    equity = [(index[p["asset"]], p["quantity"]) for p in positions if p.get("kind", "equity") == "equity"]
    options = [p for p in positions if p.get("kind", "equity") != "equity"]
    eq_asset = np.array([a for a, _ in equity], dtype=int)
    eq_qty = np.array([q for _, q in equity])
    v0 = [float(black_scholes(np.array(s0[index[o["asset"]]]), o["strike"], r, vol[index[o["asset"]]],
                              o["expiry_days"] / TRADING_DAYS, o["kind"] == "call")) for o in options]

    pnl_by_position = np.empty((n, len(positions)))
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        z = rng.standard_normal((m, len(assets))) @ chol.T
        st = s0 * np.exp((drift - 0.5 * vol**2) * h + vol * math.sqrt(h) * z)
        block = pnl_by_position[start:start + m]
        block[:, :len(equity)] = (st[:, eq_asset] - s0[eq_asset]) * eq_qty
        for j, o in enumerate(options):
            a = index[o["asset"]]
            v = black_scholes(st[:, a], o["strike"], r, vol[a], o["expiry_days"] / TRADING_DAYS - h,
                              o["kind"] == "call")
            block[:, len(equity) + j] = (v - v0[j]) * o["quantity"]

    pnl = pnl_by_position.sum(axis=1)
    loss = -pnl
    order = np.argsort(loss)[::-1]
    result = {"mean": pnl.mean(), "mean_se": pnl.std(ddof=1) / math.sqrt(n), "stdev": pnl.std(ddof=1)}
    counts, edges = np.histogram(pnl, bins=32)
    result["histogram"] = {"lo": edges[0], "hi": edges[-1], "counts": counts.tolist()}
    result["levels"] = []
    for alpha in levels:
        k = max(1, math.ceil((1 - alpha) * n - 1e-9))
        tail = order[:k]
        result["levels"].append({
            "confidence": alpha,
            "var": loss[order[k - 1]],
            "es": loss[tail].mean(),
            "es_contributions": (-pnl_by_position[tail]).mean(axis=0).tolist(),
        })
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("payload")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with open(args.payload) as f:
        payload = json.load(f)
    rng = np.random.default_rng(payload.get("seed", 0))
    best = math.inf
    for _ in range(args.repeat):
        started = time.perf_counter()
        result = risk(payload, rng)
        best = min(best, time.perf_counter() - started)
    top = result["levels"][-1]
    print(f"numpy: VaR{top['confidence'] * 100:g} {top['var']:.4g} ES {top['es']:.4g} "
          f"({payload['paths']} paths, {'scipy' if ndtr.__module__.startswith('scipy') else 'numpy'} ndtr)",
          file=sys.stderr)
    print(f"numpy paths/s per core: {payload['paths'] / best:.0f}")


if __name__ == "__main__":
    main()

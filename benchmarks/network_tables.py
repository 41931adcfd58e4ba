"""Markdown tables of ``benchmarks/results/network.json`` (written by ``test_network.py``), as in
docs/benchmarks.md: ``.venv/bin/python -m benchmarks.network_tables``."""

import json

from benchmarks import RESULTS_DIR


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _header(*names: str) -> str:
    return _row(*names) + "\n" + _row(*["---"] * len(names))


def main() -> None:
    rows = json.loads((RESULTS_DIR / "network.json").read_text())
    print(_header("N, profile", "secure (s)", "model (s)", "FedAvg (s)", "model (s)", "secure / FedAvg",
                  "busiest link, secure / FedAvg (MB)"))  # fmt: skip
    for name, r in rows.items():
        if name.startswith("secure aggregation"):
            n, net = name.split(" N=")[1].split(" K=2 on ")
            link = r["collector_bytes_in"] + r["bytes_per_party"]["aggregator0"]
            print(_row(f"{n}, {net}", f"{r['secure_s']:.2f}", f"{r['secure_model_s']:.2f}", f"{r['fedavg_s']:.2f}",
                       f"{r['fedavg_model_s']:.2f}", f"{r['ratio_fedavg']:.2f}",
                       f"{_mb(link)} / {_mb(r['coordinator_bytes_in_fedavg'])}"))  # fmt: skip
    print()
    print(_header("input, batch, profile", "ours online (s)", "model (s)", "stock online (s)", "model (s)", "speed-up",
                  "MB per party (sent + received), ours / stock", "rounds, ours / stock"))  # fmt: skip
    for name, r in rows.items():
        if name.startswith("resnet18"):
            case = name.removeprefix("resnet18 ").replace(" batch ", ", batch ").replace(" on ", ", ")
            ours, stock = r["ours"], r.get("stock") or {}
            counted = [_mb(e["bytes_sent_and_received_per_party"]) if e else "-" for e in (ours, stock)]
            print(_row(case, f"{ours['online_s']:.2f}", f"{ours['model_s']:.2f}",
                       f"{stock['online_s']:.1f}" if stock else "not run", f"{stock['model_s']:.1f}" if stock else "-",
                       f"**{r['speedup_online']:.1f}x**" if stock else "-", " / ".join(counted),
                       f"{ours['rounds']} / {stock.get('rounds', '-')}"))  # fmt: skip
    print()
    for name, r in rows.items():
        if name.startswith("federated round"):
            print(f"{name}: secure {r['secure_round_s']:.2f} s, plaintext {r['plaintext_round_s']:.2f} s per round, "
                  f"ratio {r['ratio']:.3f}; local training {r['local_training_s']}; "
                  f"busiest link {r['busiest_link_bytes']}")  # fmt: skip


if __name__ == "__main__":
    main()

"""ServerApp: FedAvg (3 nodes, evaluate disabled) timing every round.

A round is measured server-side from the moment the strategy starts
configuring it (node sampling + message creation) until aggregate_train()
has finished for it, so it contains the full message round-trip through
SuperLink -> SuperNode -> ClientApp subprocess and back.
"""

import json
import os
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records wall-clock marks per round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks = {}  # round -> {"configure": t, "aggregated": t, "replies": n}

    def configure_train(self, server_round, arrays, config, grid):
        t = time.time()
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.marks[server_round] = {"configure": t, "sent": len(msgs)}
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        mark = self.marks.setdefault(server_round, {})
        mark["aggregated"] = time.time()
        mark["replies"] = sum(1 for r in replies if not r.has_error())
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    min_nodes = int(context.run_config["min-nodes"])
    out = str(context.run_config["timings-out"])
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    initial = ArrayRecord([np.zeros(8, dtype=np.float32)])
    t0 = time.time()
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=120)
    t1 = time.time()
    payload = {
        "start": t0,
        "end": t1,
        "pid": os.getpid(),
        "rounds": [
            {"round": r, **strategy.marks[r]} for r in sorted(strategy.marks)
        ],
    }
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, out)

"""Custom code of the kaapana-node NVFlare no-op benchmark job.

NoOpExecutor (client side): answers the "train" task with the received
weights unchanged, so a round costs only the framework's own overhead.

RoundTimer (server side): records wall-clock time of ScatterAndGather's
TRAINING_STARTED / ROUND_STARTED / ROUND_DONE events and writes them as
JSON when the run ends (and after every round, so a killed run still
leaves the rounds it finished).
"""

import json
import os
import time

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType


class NoOpExecutor(Executor):
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != AppConstants.TASK_TRAIN:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        dxo = from_shareable(shareable)
        out = DXO(data_kind=DataKind.WEIGHTS, data=dxo.data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1})
        return out.to_shareable()


class RoundTimer(FLComponent):
    def __init__(self, out_path: str):
        super().__init__()
        self.out_path = out_path
        self.data = {"pid": os.getpid(), "training_started": None, "end": None, "rounds": {}}

    def _round(self, fl_ctx: FLContext) -> dict:
        r = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        return self.data["rounds"].setdefault(str(r), {"round": r})

    def _flush(self) -> None:
        tmp = self.out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.out_path)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        now = time.time()
        if event_type == AppEventType.TRAINING_STARTED:
            self.data["training_started"] = now
        elif event_type == AppEventType.ROUND_STARTED:
            self._round(fl_ctx)["started"] = now
        elif event_type == AppEventType.ROUND_DONE:
            self._round(fl_ctx)["done"] = now
            self._flush()
        elif event_type == EventType.END_RUN:
            self.data["end"] = now
            self._flush()

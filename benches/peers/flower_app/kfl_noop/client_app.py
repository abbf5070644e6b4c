"""No-op ClientApp: train() hands the received parameters straight back."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the global parameters unchanged (no training)."""
    arrays = msg.content["arrays"]
    metrics = MetricRecord({"num-examples": 1})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

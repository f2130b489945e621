"""Data: the synthetic retrieval and recall tasks and language-modelling streams."""

from fwjax.data.recall import MQARTask, MultiHopTask
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss

__all__ = ["MQARTask", "MultiHopTask", "RetrievalSetting", "RetrievalTask", "retrieval_loss"]

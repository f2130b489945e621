"""Data: the synthetic retrieval tasks and language-modelling streams."""

from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss

__all__ = ["RetrievalSetting", "RetrievalTask", "retrieval_loss"]

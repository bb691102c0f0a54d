"""The query model as an MLflow pyfunc, logged as models from code: MLflow stores this file and the checkpoint,
never a pickle, and `mlflow.pyfunc.load_model` runs this file and `load_context`, which reads the checkpoint
weights-only through cmce.checkpoint (the same loader, checks and sha256 as every cmce step).

Input: uint8 pixels N×C×H×W, as the ONNX export takes them; output: the raw float32 embeddings (N×D), as
`cmce.embed.embed_batch` gives them (an index normalises queries itself).
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class QueryModel(PythonModel):
    def load_context(self, context) -> None:
        from cmce.checkpoint import load_embedding_model
        from cmce.embed import to_inference_device

        self.model = load_embedding_model(context.artifacts["checkpoint"])
        to_inference_device(self.model)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        from cmce.embed import embed_batch

        pixels = np.ascontiguousarray(model_input, dtype=np.uint8)
        return embed_batch(self.model, torch.from_numpy(pixels))


mlflow.models.set_model(QueryModel())
